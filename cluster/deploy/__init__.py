"""`pdserve launch`: placing a cluster on an existing Ray cluster and keeping it as configured."""
