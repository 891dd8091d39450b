"""JWT verification: every refusal of DESIGN §8 and the pyjwt traps (numeric-string exp, huge tokens)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from structlog.testing import capture_logs

from api.auth import DEV_SECRET_FILE, Authenticator, AuthError, Claims, MintError
from api.settings import Settings, SettingsError

SECRET = "s" * 48


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: Any, payload: Any, key: bytes | None = SECRET.encode(), digest: Any = None) -> str:
    """A token built by hand, so we can sign what pyjwt refuses to produce (alg none, PEM as HMAC key)."""
    raw_header = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw_payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(raw_header)}.{b64(raw_payload)}"
    if key is None:
        return signing_input + "."
    sig = hmac.new(key, signing_input.encode(), digest or hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def future() -> int:
    return int(time.time()) + 600


def hs(tmp_path: Path, **kw: Any) -> Authenticator:
    kw.setdefault("jwt_secret", SECRET)
    return Authenticator.from_settings(Settings(data_dir=tmp_path, **kw))


def refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    err = info.value
    assert err.code == "unauthorized"
    if token:
        assert token not in err.message and token not in str(err) and token not in repr(err)
    return err.message


def pem(public_key: Any) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- HS256 happy path and minting -------------------------------------------------------------------------


def test_mint_verify_roundtrip(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    token = auth.mint("alice", roles=["admin", "ops"], ttl_s=60)
    claims = auth.verify(token)
    assert claims == Claims(sub="alice", exp=claims.exp, roles=frozenset({"admin", "ops"}))
    assert claims.is_admin
    assert time.time() < claims.exp <= time.time() + 61
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert isinstance(payload["iat"], int)
    assert "aud" not in payload and "iss" not in payload


def test_mint_keeps_a_fractional_lifetime(tmp_path: Path) -> None:
    """Issue 8 review: a 1.5 s token must expire 1.5 s after it was minted, not at a whole second (RFC 7519
    allows a non-integer NumericDate); rounding would make it live anywhere from 1 to 2 s."""
    auth = hs(tmp_path)
    before = time.time()
    token = auth.mint("alice", ttl_s=1.5)
    after = time.time()
    exp = jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
    assert isinstance(exp, float)
    assert before + 1.5 - 1e-6 <= exp <= after + 1.5 + 1e-6, (before, exp, after)
    assert auth.verify(token).exp == exp  # verification keeps the fraction too


def test_no_roles_is_not_admin(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    claims = auth.verify(auth.mint("bob"))
    assert claims.roles == frozenset() and not claims.is_admin


def test_mint_rejects_bad_arguments(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    for sub in ("", "x" * 257, "a\nb"):
        with pytest.raises(ValueError):
            auth.mint(sub)
    with pytest.raises(ValueError):
        auth.mint("alice", roles="admin")
    with pytest.raises(ValueError):
        auth.mint("alice", ttl_s=0)


def test_hand_crafted_hs256_accepted(tmp_path: Path) -> None:
    """Guards the helper: a well-formed hand-made token verifies, so the refusals below are meaningful."""
    auth = hs(tmp_path)
    claims = auth.verify(craft({"alg": "HS256", "typ": "JWT"}, {"sub": "u", "exp": future(), "roles": []}))
    assert claims.sub == "u"


# --- refusals ------------------------------------------------------------------------------------------------


def test_expired(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    token = craft({"alg": "HS256"}, {"sub": "u", "exp": int(time.time()) - 5})
    assert refused(auth, token) == "token expired"


def test_bad_signature(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    other = craft({"alg": "HS256"}, {"sub": "u", "exp": future()}, key=b"o" * 48)
    assert refused(auth, other) == "bad signature"
    good = auth.mint("u")
    head, _payload, sig = good.split(".")
    forged = f"{head}.{b64(json.dumps({'sub': 'admin', 'exp': future()}).encode())}.{sig}"
    assert refused(auth, forged) == "bad signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("with_sig", [False, True])
def test_alg_none_refused(tmp_path: Path, alg: str, with_sig: bool) -> None:
    auth = hs(tmp_path)
    token = craft({"alg": alg, "typ": "JWT"}, {"sub": "u", "exp": future()}, key=None)
    if with_sig:
        token += b64(b"junk")
    assert refused(auth, token) == "algorithm not allowed"


def test_other_hmac_algorithm_refused(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    token = craft({"alg": "HS512"}, {"sub": "u", "exp": future()}, digest=hashlib.sha512)
    assert refused(auth, token) == "algorithm not allowed"


def test_hs_rs_confusion_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """A token HMAC-signed with the public PEM (which attackers know) must not pass an RS256 server."""
    public_pem = pem(rsa_key.public_key())
    auth = Authenticator.from_settings(Settings(data_dir=tmp_path, jwt_public_key=public_pem))
    assert auth.algorithm == "RS256"
    token = craft({"alg": "HS256"}, {"sub": "admin", "exp": future(), "roles": ["admin"]}, key=public_pem.encode())
    assert refused(auth, token) == "algorithm not allowed"


def test_rs256_token_refused_by_hs256_server(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = hs(tmp_path)
    token = jwt.encode({"sub": "u", "exp": future()}, rsa_key, algorithm="RS256")
    assert refused(auth, token) == "algorithm not allowed"


@pytest.mark.parametrize("exp", ["9999999999", "1e12", True, None, [9999999999], 10**400, 1e400])
def test_exp_must_be_a_number(tmp_path: Path, exp: Any) -> None:
    auth = hs(tmp_path)
    message = refused(auth, craft({"alg": "HS256"}, {"sub": "u", "exp": exp}))
    assert message in {"invalid claim: exp", "missing claim: exp", "token expired", "malformed token"}
    if exp == "9999999999":  # the pyjwt trap: it accepts this itself
        assert message == "invalid claim: exp"


def test_exp_float_accepted(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    assert auth.verify(craft({"alg": "HS256"}, {"sub": "u", "exp": future() + 0.5})).exp == future() + 0.5


def test_iat_string_refused(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    token = craft({"alg": "HS256"}, {"sub": "u", "exp": future(), "iat": str(int(time.time()))})
    assert refused(auth, token) == "invalid claim: iat"


def test_nbf_in_future_refused(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    token = craft({"alg": "HS256"}, {"sub": "u", "exp": future(), "nbf": future()})
    assert refused(auth, token) == "token not yet valid"


FUTURE = "<future>"  # replaced by a real expiry when the test runs


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"exp": FUTURE}, "missing claim: sub"),
        ({"sub": None, "exp": FUTURE}, "missing claim: sub"),
        ({"sub": "u"}, "missing claim: exp"),
        ({"sub": "", "exp": FUTURE}, "invalid claim: sub"),
        ({"sub": 42, "exp": FUTURE}, "invalid claim: sub"),
        ({"sub": ["u"], "exp": FUTURE}, "invalid claim: sub"),
        ({"sub": "x" * 257, "exp": FUTURE}, "invalid claim: sub"),
        ({"sub": "a\x00b", "exp": FUTURE}, "invalid claim: sub"),
    ],
)
def test_sub_and_exp_required_and_typed(tmp_path: Path, payload: dict[str, Any], message: str) -> None:
    body = {k: future() if v == FUTURE else v for k, v in payload.items()}
    assert refused(hs(tmp_path), craft({"alg": "HS256"}, body)) == message


def test_sub_of_256_chars_accepted(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    assert auth.verify(auth.mint("x" * 256)).sub == "x" * 256


@pytest.mark.parametrize("roles", ["admin", [1], [["admin"]], {"admin": True}, None, ["admin", None]])
def test_roles_must_be_list_of_str(tmp_path: Path, roles: Any) -> None:
    auth = hs(tmp_path)
    token = craft({"alg": "HS256"}, {"sub": "u", "exp": future(), "roles": roles})
    assert refused(auth, token) == "invalid claim: roles"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "a.b",
        craft({"alg": "HS256"}, b"not json"),
        craft({"alg": "HS256"}, b'{"sub": "u", "exp": 99999999999'),
        craft(b"[1]", {"sub": "u", "exp": 99999999999}),
        craft(b"not json", {"sub": "u", "exp": 99999999999}),
        "ééé.ééé.ééé",
    ],
)
def test_malformed(tmp_path: Path, token: str) -> None:
    assert refused(hs(tmp_path), token) == "malformed token"


def test_payload_not_object_refused(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    assert refused(auth, craft({"alg": "HS256"}, ["sub", "exp"])) == "malformed token"


def test_non_str_token_refused(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="malformed token"):
        hs(tmp_path).verify(b"abc")  # type: ignore[arg-type]


def test_long_token_refused_before_decoding(tmp_path: Path) -> None:
    """pyjwt spends ~114 ms on a 1 MiB token (TRAPS); the cap must answer without decoding it."""
    auth = hs(tmp_path)
    at_cap = craft({"alg": "HS256"}, {"sub": "u", "exp": future(), "pad": "p" * 2950})
    assert 4000 < len(at_cap) <= 4096
    assert auth.verify(at_cap).sub == "u"
    just_over = craft({"alg": "HS256"}, {"sub": "u", "exp": future(), "pad": "p" * 3050})
    assert len(just_over) > 4096
    assert refused(auth, just_over) == "token too long"
    huge = craft({"alg": "HS256"}, {"sub": "u", "exp": future(), "pad": "p" * (1 << 20)})
    start = time.perf_counter()
    for _ in range(100):
        with pytest.raises(AuthError, match="token too long"):
            auth.verify(huge)
    assert (time.perf_counter() - start) / 100 < 0.001


def test_token_cap_follows_settings(tmp_path: Path) -> None:
    auth = hs(tmp_path, max_token_bytes=200)
    token = auth.mint("u", roles=["r" * 200])
    assert refused(auth, token) == "token too long"


# --- audience and issuer ------------------------------------------------------------------------------------


def test_aud_iss_checked_when_configured(tmp_path: Path) -> None:
    auth = hs(tmp_path, jwt_audience="sessiond", jwt_issuer="https://idp.example")
    token = auth.mint("u")
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], audience="sessiond")
    assert payload["aud"] == "sessiond" and payload["iss"] == "https://idp.example"
    assert auth.verify(token).sub == "u"
    base = {"sub": "u", "exp": future()}
    iss = {"iss": "https://idp.example"}
    aud = {"aud": "sessiond"}
    assert refused(auth, craft({"alg": "HS256"}, {**base, **iss})) == "missing claim: aud"
    assert refused(auth, craft({"alg": "HS256"}, {**base, **aud})) == "missing claim: iss"
    assert refused(auth, craft({"alg": "HS256"}, {**base, **iss, "aud": "other"})) == "wrong audience"
    assert refused(auth, craft({"alg": "HS256"}, {**base, **iss, "aud": ["a", "b"]})) == "wrong audience"
    assert refused(auth, craft({"alg": "HS256"}, {**base, **aud, "iss": "https://evil"})) == "wrong issuer"
    assert auth.verify(craft({"alg": "HS256"}, {**base, **iss, "aud": ["x", "sessiond"]})).sub == "u"


def test_aud_not_checked_when_unconfigured(tmp_path: Path) -> None:
    auth = hs(tmp_path)
    token = craft({"alg": "HS256"}, {"sub": "u", "exp": future(), "aud": "anything", "iss": "anyone"})
    assert auth.verify(token).sub == "u"


# --- RS256 / ES256 --------------------------------------------------------------------------------------------


def test_rs256_happy_path(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator.from_settings(
        Settings(data_dir=tmp_path, jwt_public_key=pem(rsa_key.public_key()), jwt_audience="sessiond")
    )
    assert auth.algorithm == "RS256" and not auth.can_mint
    token = jwt.encode(
        {"sub": "carol", "exp": future(), "aud": "sessiond", "roles": ["admin"]}, rsa_key, algorithm="RS256"
    )
    assert auth.verify(token) == Claims(sub="carol", exp=float(future()), roles=frozenset({"admin"}))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "carol", "exp": future(), "aud": "sessiond"}, other, algorithm="RS256")
    assert refused(auth, forged) == "bad signature"
    assert not list(tmp_path.iterdir())  # no dev secret written


def test_es256_happy_path_detected_from_key(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    auth = Authenticator.from_settings(Settings(data_dir=tmp_path, jwt_public_key=pem(ec_key.public_key())))
    assert auth.algorithm == "ES256"
    token = jwt.encode({"sub": "dave", "exp": future()}, ec_key, algorithm="ES256")
    assert auth.verify(token).sub == "dave"
    rs_token = craft({"alg": "RS256"}, {"sub": "dave", "exp": future()})
    assert refused(auth, rs_token) == "algorithm not allowed"


def test_explicit_es256_setting(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    settings = Settings(data_dir=tmp_path, jwt_public_key=pem(ec_key.public_key()), jwt_algorithm="ES256")
    assert Authenticator.from_settings(settings).algorithm == "ES256"


def test_mint_with_public_key_explains(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator.from_settings(Settings(data_dir=tmp_path, jwt_public_key=pem(rsa_key.public_key())))
    with pytest.raises(MintError, match="private key"):
        auth.mint("u")


def test_public_key_wins_over_secret_when_algorithm_unset(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    with capture_logs() as logs:
        auth = hs(tmp_path, jwt_public_key=pem(rsa_key.public_key()))
    assert auth.algorithm == "RS256"
    assert any("ignored" in entry["event"] for entry in logs)
    both = hs(tmp_path, jwt_public_key=pem(rsa_key.public_key()), jwt_algorithm="HS256")
    assert both.algorithm == "HS256" and both.verify(both.mint("u")).sub == "u"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"jwt_public_key": "not a pem"}, "not a PEM"),
        ({"jwt_algorithm": "RS256"}, "needs a public key"),
        ({"jwt_algorithm": "ES256", "jwt_secret": SECRET}, "needs a public key"),
    ],
)
def test_bad_configuration(tmp_path: Path, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        Authenticator.from_settings(Settings(data_dir=tmp_path, **kw))


def test_key_type_must_match_algorithm(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(SettingsError, match="does not match"):
        Authenticator.from_settings(
            Settings(data_dir=tmp_path, jwt_public_key=pem(rsa_key.public_key()), jwt_algorithm="ES256")
        )


def test_weak_or_unsupported_keys_refused(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(SettingsError, match="1024 bits"):
        Authenticator.from_settings(Settings(data_dir=tmp_path, jwt_public_key=pem(small.public_key())))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(SettingsError, match="P-256"):
        Authenticator.from_settings(Settings(data_dir=tmp_path, jwt_public_key=pem(p384.public_key())))


def test_pem_as_secret_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(SettingsError, match="PEM"):
        hs(tmp_path, jwt_secret=pem(rsa_key.public_key()))


# --- secrets: short ones and dev mode ---------------------------------------------------------------------------


def test_short_secret_warns_but_works(tmp_path: Path) -> None:
    """Warn once through structlog; pyjwt's own per-call warning would be an error under filterwarnings."""
    with capture_logs() as logs:
        auth = hs(tmp_path, jwt_secret="short")
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert warnings and "short" in warnings[0]["event"]
    assert "short" not in json.dumps([{k: v for k, v in e.items() if k != "event"} for e in warnings])
    assert auth.verify(auth.mint("u")).sub == "u"


def test_long_secret_does_not_warn(tmp_path: Path) -> None:
    with capture_logs() as logs:
        hs(tmp_path)
    assert logs == []


def test_dev_mode_creates_and_reuses_secret(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with capture_logs() as logs:
        first = Authenticator.from_settings(Settings(data_dir=data_dir))
    assert any("dev mode" in e["event"] and e["log_level"] == "warning" for e in logs)
    secret_file = data_dir / DEV_SECRET_FILE
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    secret = secret_file.read_text().strip()
    assert len(bytes.fromhex(secret)) == 32
    assert all(secret not in json.dumps(e, default=str) for e in logs)
    assert [p.name for p in data_dir.iterdir()] == [DEV_SECRET_FILE]  # no temp files left behind
    token = first.mint("u")
    restarted = Authenticator.from_settings(Settings(data_dir=data_dir))
    assert restarted.verify(token).sub == "u"
    assert secret_file.read_text().strip() == secret
    elsewhere = Authenticator.from_settings(Settings(data_dir=tmp_path / "other"))
    assert refused(elsewhere, token) == "bad signature"


def test_dev_mode_replaces_truncated_secret(tmp_path: Path) -> None:
    tmp_path.joinpath(DEV_SECRET_FILE).write_text("")
    auth = Authenticator.from_settings(Settings(data_dir=tmp_path))
    assert len(tmp_path.joinpath(DEV_SECRET_FILE).read_text().strip()) == 64
    assert auth.verify(auth.mint("u")).sub == "u"


# ---- verified tokens remembered: the same token's next uses skip the decoding, never its expiry ----


class CountingCodec:
    """Wraps the authenticator's pyjwt codec, counting full verifications."""

    def __init__(self, auth: Authenticator) -> None:
        self.inner = auth._codec
        self.calls = 0
        auth._codec = self  # type: ignore[assignment]

    def decode(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.inner.decode(*args, **kw)

    def encode(self, *args: Any, **kw: Any) -> Any:
        return self.inner.encode(*args, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def clocked(clock: Clock) -> Authenticator:
    return Authenticator(algorithm="HS256", key=SECRET, clock=clock)


def test_a_verified_token_is_not_decoded_again() -> None:
    auth = clocked(Clock())
    codec = CountingCodec(auth)
    token = auth.mint("alice", roles=["admin"], ttl_s=60)
    first = auth.verify(token)
    assert auth.verify(token) == first and auth.verify(token).is_admin
    assert codec.calls == 1
    other = auth.mint("bob", ttl_s=60)
    assert auth.verify(other).sub == "bob" and codec.calls == 2


def test_a_remembered_token_still_expires() -> None:
    clock = Clock()
    auth = clocked(clock)
    token = auth.mint("alice", ttl_s=1.5)  # a lifetime not rounded to whole seconds
    exp = auth.verify(token).exp
    clock.now = exp - 0.001
    assert auth.verify(token).sub == "alice"
    clock.now = exp
    assert refused(auth, token) == "token expired"
    assert token not in auth._verified  # forgotten: a later use is judged by pyjwt from scratch


def test_refused_tokens_are_never_remembered() -> None:
    auth = clocked(Clock())
    codec = CountingCodec(auth)
    token = auth.mint("alice", ttl_s=60)
    auth.verify(token)
    # Another signature over the same claims: a character inside it (the last one also carries padding bits, which
    # base64 decoding ignores, so changing it alone may leave the signature as it was).
    i = len(token) - 5
    tampered = token[:i] + ("B" if token[i] != "B" else "C") + token[i + 1 :]
    for _ in range(2):
        assert refused(auth, tampered) == "bad signature"
    forged = craft({"alg": "HS256", "typ": "JWT"}, {"sub": "alice", "exp": future()}, key=b"k" * 48)
    for _ in range(2):
        assert refused(auth, forged) == "bad signature"
    assert codec.calls == 5


def test_remembered_tokens_are_bounded_oldest_first() -> None:
    from api.auth import VERIFIED_TOKENS

    auth = clocked(Clock())
    codec = CountingCodec(auth)
    tokens = [auth.mint(f"user-{i}", ttl_s=60) for i in range(VERIFIED_TOKENS + 3)]
    for token in tokens:
        auth.verify(token)
    assert len(auth._verified) == VERIFIED_TOKENS
    calls = codec.calls
    auth.verify(tokens[-1])  # recent: remembered
    assert codec.calls == calls
    auth.verify(tokens[0])  # among the 3 oldest: pushed out, verified again
    assert codec.calls == calls + 1
