"""JWT verification and dev-token minting (DESIGN §8; TRAPS: pyjwt).

The algorithm is pinned from configuration, never read from the token header, so `alg: none` and HS/RS key
confusion are refused. pyjwt accepts an `exp` given as a numeric string and happily decodes a 1 MiB token, so
the length is capped before decoding and every claim we rely on is type-checked afterwards.
Pure CPU and cheap: no trio here; `from_settings` touches the disk only in dev mode, at startup.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from structlog.typing import FilteringBoundLogger

from api.logs import get_logger
from api.settings import Settings, SettingsError
from protocol import codes

ADMIN_ROLE = "admin"
MAX_SUB_CHARS = 256
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
DEV_SECRET_FILE = "jwt-secret"
# Verified tokens remembered (`Authenticator.verify`): a few browser tabs, devices and SDK clients per user at a time.
VERIFIED_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified identity of a caller; only what the server relies on."""

    sub: str
    exp: float
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


class AuthError(Exception):
    """A token was refused; `message` says why and never quotes the token."""

    code = codes.E_UNAUTHORIZED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MintError(SettingsError):
    """The configured key cannot sign tokens (only a public key is configured)."""


class _QuietHMAC(HMACAlgorithm):
    """HS256 without pyjwt's per-call short-key warning: we warn once at startup instead (TRAPS: pyjwt)."""

    def check_key_length(self, key: bytes) -> str | None:
        return None


def _quiet_codec() -> jwt.PyJWT:
    codec = jwt.PyJWT()
    jws = codec._jws  # pyjwt has no public hook to swap an algorithm on a PyJWT instance
    jws.unregister_algorithm("HS256")
    jws.register_algorithm("HS256", _QuietHMAC(HMACAlgorithm.SHA256))
    return codec


def _load_public_key(pem: str) -> tuple[str, Any]:
    """(algorithm, key object) for a PEM public key; the key type decides RS256 vs ES256."""
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise SettingsError("jwt_public_key: not a PEM public key") from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SettingsError(f"jwt_public_key: RSA key of {key.key_size} bits, need {MIN_RSA_BITS}")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise SettingsError(f"jwt_public_key: ES256 needs a P-256 key, got {key.curve.name}")
        return "ES256", key
    raise SettingsError("jwt_public_key: only RSA (RS256) and EC P-256 (ES256) keys are supported")


def _dev_secret(data_dir: Path, log: FilteringBoundLogger) -> str:
    """A random secret kept in the data dir (0600), so dev tokens survive restarts."""
    path = data_dir / DEV_SECRET_FILE
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            secret = path.read_text().strip()
        except FileNotFoundError:
            secret = ""
        if len(secret) < 2 * MIN_SECRET_BYTES:
            secret = _write_dev_secret(path)
    except OSError as exc:
        raise SettingsError(f"jwt dev secret: cannot use {path}: {exc.strerror}") from exc
    if path.stat().st_mode & 0o077:
        log.warning("jwt dev secret file is readable by others", path=str(path))
    log.warning(
        "no SESSIOND_JWT_SECRET or SESSIOND_JWT_PUBLIC_KEY_FILE: dev mode, using a generated HS256 secret",
        path=str(path),
    )
    return secret


def _write_dev_secret(path: Path) -> str:
    """Write atomically and never overwrite: a concurrent starter's secret wins and is read back."""
    secret = secrets.token_hex(MIN_SECRET_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = path.read_text().strip()
            if len(existing) >= 2 * MIN_SECRET_BYTES:
                return existing
            os.replace(tmp, path)  # a truncated leftover: replace it
    finally:
        tmp.unlink(missing_ok=True)
    return secret


class Authenticator:
    """Verifies bearer tokens with one configured algorithm and key; mints dev tokens given a secret."""

    def __init__(
        self,
        *,
        algorithm: str,
        key: Any,
        max_token_bytes: int = 4096,
        audience: str | None = None,
        issuer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if algorithm not in ("HS256", "RS256", "ES256"):
            raise SettingsError(f"jwt_algorithm: {algorithm} is not supported")
        self.algorithm = algorithm
        self._key = key.encode() if isinstance(key, str) else key
        self._max_chars = max_token_bytes
        self._audience = audience
        self._issuer = issuer
        self._algorithms = [algorithm]
        require = ["sub", "exp"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
        # "checked when configured": an unconfigured audience does not refuse tokens that carry one
        self._options: Any = {"require": require, "verify_aud": audience is not None}
        self._codec = _quiet_codec()
        self._clock = clock
        self._verified: dict[str, Claims] = {}  # token -> its claims, oldest first (see `verify`)
        if algorithm == "HS256":
            try:
                self._codec._jws.get_algorithm_by_name("HS256").prepare_key(self._key)
            except jwt.InvalidKeyError as exc:
                raise SettingsError("jwt_secret: looks like a PEM key, not an HMAC secret") from exc

    @classmethod
    def from_settings(cls, settings: Settings, log: FilteringBoundLogger | None = None) -> Authenticator:
        """Pick algorithm and key from settings (DESIGN §9); dev mode creates a secret in the data dir."""
        log = log if log is not None else get_logger("sessiond.auth")
        alg = settings.jwt_algorithm
        key: Any
        if settings.jwt_public_key and alg != "HS256":
            key_alg, key = _load_public_key(settings.jwt_public_key)
            if alg is not None and alg != key_alg:
                raise SettingsError(f"jwt_algorithm {alg} does not match the public key ({key_alg})")
            alg = key_alg
            if settings.jwt_secret:
                log.warning("jwt secret ignored: a public key is configured", algorithm=alg)
        elif alg in ("RS256", "ES256"):
            raise SettingsError(f"jwt_algorithm {alg} needs a public key (SESSIOND_JWT_PUBLIC_KEY_FILE)")
        else:
            alg = "HS256"
            key = settings.jwt_secret or _dev_secret(settings.data_dir, log)
            if len(key.encode()) < MIN_SECRET_BYTES:
                log.warning(
                    "jwt secret is short; use at least 32 random bytes",
                    secret_bytes=len(key.encode()),
                    recommended=MIN_SECRET_BYTES,
                )
        return cls(
            algorithm=alg,
            key=key,
            max_token_bytes=settings.max_token_bytes,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )

    @property
    def can_mint(self) -> bool:
        return self.algorithm == "HS256"

    def verify(self, token: str) -> Claims:
        """The claims of a valid token, or AuthError naming the first problem found.

        A token that passed every check is remembered, keyed by its exact text, and served from memory until its
        `exp` (checked again at each use) or until `VERIFIED_TOKENS` newer ones push it out. The same token comes
        back on every tab, every reconnect and every REST call of a client, and its verification cost 64 µs of
        CPU (pyjwt, HS256, timeit, 2026-12-03): about what sessiond's connect cost beyond the bare transport's
        (`bench capacity`). Envoy's jwt_authn keeps such a cache too. Nothing is remembered of a refused token, and
        a token differing by one character is verified from scratch. The key and the checks are fixed for this
        object's life, so a remembered verdict stays right until expiry. Memory: at most `VERIFIED_TOKENS` tokens
        of at most `max_token_bytes` each (4 MiB with the defaults; a typical token is a few hundred bytes).
        """
        if not isinstance(token, str) or not token:
            raise AuthError("malformed token")
        if len(token) > self._max_chars:  # chars <= bytes: refuse before any decoding work
            raise AuthError("token too long")
        known = self._verified.get(token)
        if known is not None:
            if self._clock() < known.exp:  # pyjwt's rule: valid while exp > now
                return known
            del self._verified[token]
            raise AuthError("token expired")
        if not token.isascii():
            raise AuthError("malformed token")
        try:
            payload = self._codec.decode(
                token,
                key=self._key,
                algorithms=self._algorithms,
                options=self._options,
                audience=self._audience,
                issuer=self._issuer,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm not allowed") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing claim: {exc.claim}") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidIssuedAtError:
            raise AuthError("invalid claim: iat") from None
        except InvalidSubjectError:
            raise AuthError("invalid claim: sub") from None
        except InvalidJTIError:
            raise AuthError("invalid claim: jti") from None
        except Exception:  # DecodeError and anything else pyjwt lets escape on hostile input
            raise AuthError("malformed token") from None
        claims = _claims(payload)
        verified = self._verified
        if len(verified) >= VERIFIED_TOKENS:
            del verified[next(iter(verified))]  # the oldest: a bounded memory, whoever sends tokens
        verified[token] = claims
        return claims

    def mint(self, sub: str, *, roles: Sequence[str] = (), ttl_s: float = 3600) -> str:
        """A token for `sub` signed with the configured secret (`sessiond token`, tests)."""
        if not self.can_mint:
            raise MintError(
                f"cannot mint {self.algorithm} tokens: the server holds only the public key; "
                "sign tokens with your private key (your identity provider)"
            )
        if not _valid_sub(sub):
            raise ValueError(f"sub must be a non-empty printable string of at most {MAX_SUB_CHARS} chars")
        if isinstance(roles, str) or not all(isinstance(r, str) and r for r in roles):
            raise ValueError("roles must be a sequence of non-empty strings")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        # Exact lifetimes (RFC 7519 allows a non-integer NumericDate): a 1.5 s token lives 1.5 s, not 1-2 s.
        now = time.time()
        payload: dict[str, Any] = {"sub": sub, "iat": int(now), "exp": now + ttl_s}
        if roles:
            payload["roles"] = list(roles)
        if self._audience:
            payload["aud"] = self._audience
        if self._issuer:
            payload["iss"] = self._issuer
        return self._codec.encode(payload, self._key, algorithm="HS256")


def _valid_sub(sub: object) -> bool:
    return isinstance(sub, str) and 0 < len(sub) <= MAX_SUB_CHARS and sub.isprintable()


def _is_number(value: object) -> bool:
    """A finite JSON number that fits a float; bools and numeric strings are not numbers here."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # a 400-digit integer is valid JSON
        return False


def _claims(payload: Mapping[str, Any]) -> Claims:
    """Type-check what pyjwt does not: it accepts numeric strings for exp/iat."""
    sub = payload.get("sub")
    if not _valid_sub(sub):
        raise AuthError("invalid claim: sub")
    exp = payload.get("exp")
    if not _is_number(exp):
        raise AuthError("invalid claim: exp")
    if "iat" in payload and not _is_number(payload["iat"]):
        raise AuthError("invalid claim: iat")
    roles = payload.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthError("invalid claim: roles")
    assert isinstance(sub, str) and isinstance(exp, int | float)
    return Claims(sub=sub, exp=float(exp), roles=frozenset(roles))
