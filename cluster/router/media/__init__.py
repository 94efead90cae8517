"""Multimodal input at the router: image parts of chat requests fetched, verified and hashed
(torch-free). policy.py: the settings; fetch.py: URL -> bytes, bounded; image.py: bytes -> a
verified image and its content hash; content.py: a request's media parts -> `load_chat_media`,
the seam the serving path calls; errors.py: the refusals and their HTTP statuses."""
