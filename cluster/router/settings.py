"""RouterSettings: what the HTTP front needs besides its backend (auth, limits, reasoning parser, media)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.router.media.policy import MediaSettings

API_KEY_ENV = "PDSERVE_API_KEY"
ADMIN_API_KEY_ENV = "PDSERVE_ADMIN_API_KEY"
DEFAULT_MAX_BODY_BYTES = 4 << 20


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # repr=False: settings get logged, keys must never be.
    api_keys: list[str] = Field(default_factory=list, repr=False, description="accepted Bearer keys; empty = no auth")
    admin_api_keys: list[str] = Field(
        default_factory=list, repr=False,
        description="Bearer keys of the /admin API (user keys do not open it); empty = the admin API is off")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    rate_limit_per_minute: int | None = Field(None, gt=0, description="requests per API key per minute")
    reasoning_parser: str | None = Field(None, description="e.g. 'think'; None = no reasoning split")
    served_model_name: str | None = Field(None, description="None = the backend's model name")
    media: MediaSettings = Field(MediaSettings(), description="image input: limits, caps, fetch policy")

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        if any(not k for k in keys):
            raise ValueError("API keys must be non-empty strings")
        return keys

    @field_validator("reasoning_parser")
    @classmethod
    def _parser(cls, name: str | None) -> str | None:
        if name is not None:
            from cluster.router.reasoning import get_reasoning_parser

            get_reasoning_parser(name)  # ValueError naming the known parsers
        return name

    @classmethod
    def with_env_keys(cls, api_keys: list[str] | None = None, environ: Mapping[str, str] | None = None,
                      admin_api_keys: list[str] | None = None, **fields: Any) -> "RouterSettings":
        """Settings whose keys come from the flags when given, else from $PDSERVE_API_KEY and
        $PDSERVE_ADMIN_API_KEY (comma separated)."""
        env = os.environ if environ is None else environ
        keys = list(api_keys) if api_keys else api_keys_from_env(env)
        admin = list(admin_api_keys) if admin_api_keys else api_keys_from_env(env, ADMIN_API_KEY_ENV)
        return cls(api_keys=keys, admin_api_keys=admin, **fields)


def api_keys_from_env(environ: Mapping[str, str], name: str = API_KEY_ENV) -> list[str]:
    return [k.strip() for k in environ.get(name, "").split(",") if k.strip()]
