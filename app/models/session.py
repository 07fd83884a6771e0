"""Review UI sessions: a sign-in at /ui/login, held server-side so the browser never holds a key.

The cookie carries a random token; only its sha256 is stored, so a copy of the table signs no
one in. A session ends when it expires, at sign-out, or when its API key is revoked or deleted.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class UiSession(Base):
    __tablename__ = "ui_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    # sha256 of the cookie's token: tokens are 256-bit random, so a fast hash is enough.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
