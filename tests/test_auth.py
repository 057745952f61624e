"""Access control in-process: logins, the policy, tokens, and one test per known registry hole."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mirror.auth.tokens import parse_scopes
from mirror.auth.users import create_robot
from mirror.config import ConfigError, load_config_data
from tests.auth_helpers import PASSWORDS, auth_config, basic, hashed, start
from tests.registry_helpers import (
    OCI_MANIFEST,
    digest_of,
    error_codes,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
)
from tests.test_bad_input import raw_request


@pytest.fixture
async def clients(aiohttp_client: Any, tmp_path: Path) -> Any:
    return await start(aiohttp_client, auth_config(tmp_path))


def bearer_params(response_header: str) -> dict[str, str]:
    scheme, _, rest = response_header.partition(" ")
    assert scheme == "Bearer", response_header
    params = {}
    for part in rest.split(","):
        key, _, value = part.partition("=")
        params[key.strip()] = value.strip().strip('"')
    return params


async def token_for(client: Any, *scopes: str, **query: str) -> dict[str, Any]:
    params = [("service", "mirror"), *(("scope", s) for s in scopes), *query.items()]
    async with client.get("/auth/token", params=params) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


# -- logging in -------------------------------------------------------------------------------------


async def test_v2_asks_anonymous_callers_for_credentials_so_docker_login_sends_them(clients: Any) -> None:
    async with clients.anonymous.get("/v2/") as response:
        assert response.status == 401
        assert await error_codes(response) == ["UNAUTHORIZED"]
        challenge = bearer_params(response.headers["WWW-Authenticate"])
    assert challenge["realm"] == f"http://{clients.anonymous.host}:{clients.anonymous.port}/auth/token"
    assert challenge["service"] == "mirror"
    alice = await clients.as_("alice")
    async with alice.get("/v2/") as response:
        assert response.status == 200
    # Anonymous pulls keep working everywhere else: a public repository answers without credentials.
    await push_image(alice, "public/app", "1")
    async with clients.anonymous.get("/v2/public/app/manifests/1") as response:
        assert response.status == 200


async def test_wrong_password_and_unknown_user_are_401(clients: Any) -> None:
    for user, password in (("alice", "nope"), ("mallory", "x")):
        client = await clients.login(user, password)
        async with client.get("/v2/") as response:
            assert response.status == 401
            assert await error_codes(response) == ["UNAUTHORIZED"]
            assert "WWW-Authenticate" in response.headers


async def test_password_over_72_bytes_is_401_not_500(clients: Any) -> None:
    for password in ("p" * 73, "é" * 40, "x" * 5000):
        client = await clients.as_("alice", password)
        async with client.get("/v2/") as response:
            assert response.status == 401, await response.text()
    # Malformed Basic credentials as well.
    for header in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Negotiate abc", "Basic"):
        async with clients.anonymous.get("/v2/", headers={"Authorization": header}) as response:
            assert response.status == 401


async def test_htpasswd_users_are_reloaded_when_the_file_changes(clients: Any, tmp_path: Path) -> None:
    bob = await clients.as_("bob")
    async with bob.get("/v2/") as response:
        assert response.status == 200
    (tmp_path / "htpasswd").write_text(f"dave:{hashed('dave-pw')}\n# comment\nmd5user:$apr1$abc$def\n")
    time.sleep(1.1)  # the file is looked at at most once a second
    dave = await clients.login("dave", "dave-pw")
    async with dave.get("/v2/") as response:
        assert response.status == 200
    # bob was removed from the file: his cached credential no longer opens the door either.
    async with bob.get("/v2/") as response:
        assert response.status == 401


async def test_robot_accounts_log_in_and_expire(clients: Any, tmp_path: Path) -> None:
    robots = tmp_path / "data" / "auth" / "robots.json"
    secret = create_robot(robots, "builder", ["ci"], None)
    assert len(secret) >= 60 and os.stat(robots).st_mode & 0o777 == 0o600
    expired_secret = create_robot(robots, "old", ["ci"], time.time() - 1)
    time.sleep(1.1)
    robot = await clients.login("robot$builder", secret)
    await push_image(robot, "team/robot-made", "1")
    old = await clients.login("robot$old", expired_secret)
    async with old.get("/v2/") as response:
        assert response.status == 401


async def test_failed_logins_back_off_per_address(aiohttp_client: Any, tmp_path: Path) -> None:
    clients = await start(
        aiohttp_client, auth_config(tmp_path, login_backoff={"free_failures": 3, "initial": "1s", "maximum": "1s"})
    )
    wrong = await clients.as_("alice", "wrong")
    for _ in range(3):
        async with wrong.get("/v2/") as response:
            assert response.status == 401
    right = await clients.as_("alice")
    async with right.get("/v2/") as response:
        assert response.status == 429
        assert await error_codes(response) == ["TOOMANYREQUESTS"]
        assert int(response.headers["Retry-After"]) >= 1
    # Anonymous pulls from the same address are not held back.
    async with clients.anonymous.get("/v2/public/none/tags/list") as response:
        assert response.status == 404
    time.sleep(1.1)
    async with right.get("/v2/") as response:
        assert response.status == 200


async def test_unknown_users_take_as_long_as_known_ones(aiohttp_client: Any, tmp_path: Path) -> None:
    # Real-cost hashes so bcrypt, not the test's noise, dominates; a generous bound, not a tight timing.
    users = {"alice": {"password_hash": hashed("alice-pw", cost=10)}}
    clients = await start(aiohttp_client, auth_config(tmp_path, users=users, htpasswd=None,
                                                      credential_cache_ttl=0))

    async def seconds(user: str) -> float:
        client = await clients.login(user, "wrong-password")
        started = time.perf_counter()
        async with client.get("/v2/") as response:
            assert response.status == 401
        return time.perf_counter() - started

    await seconds("nobody")  # the first unknown name makes the dummy hash; not a sample
    known_samples, unknown_samples = [], []
    for i in range(11):  # interleaved, so a busy neighbour slows both alike
        known_samples.append(await seconds("alice"))
        unknown_samples.append(await seconds(f"nobody-{i}"))
    known, unknown = statistics.median(known_samples), statistics.median(unknown_samples)
    assert known > 0.01  # bcrypt really ran
    assert 0.5 < unknown / known < 2.0, (known, unknown)


# -- the policy -------------------------------------------------------------------------------------


async def test_push_allowed_in_own_namespace_and_denied_elsewhere_with_a_clear_message(clients: Any) -> None:
    alice = await clients.as_("alice")
    await push_image(alice, "team/app", "1")
    async with alice.post("/v2/other/app/blobs/uploads/") as response:
        assert response.status == 403
        body = await response.json()
    assert body["errors"][0]["code"] == "DENIED"
    assert "alice may not push other/app" in body["errors"][0]["message"]
    async with clients.anonymous.post("/v2/team/app/blobs/uploads/") as response:
        assert response.status == 401  # a stranger is asked to log in, not told "forbidden"
        assert "scope=\"repository:team/app:pull,push\"" in response.headers["WWW-Authenticate"]


async def test_tag_overwrite_needs_overwrite(clients: Any) -> None:
    alice, ops = await clients.as_("alice"), await clients.as_("ops")
    digest, body = await push_image(alice, "team/app", "latest")
    # The same manifest again is no move (CI re-pushes): allowed.
    response = await put_manifest(alice, "team/app", "latest", body, OCI_MANIFEST)
    assert response.status == 201
    other = image_manifest(b'{"architecture":"arm64","os":"linux"}', [b"layer one"])
    await push_blob(alice, "team/app", b'{"architecture":"arm64","os":"linux"}')
    response = await put_manifest(alice, "team/app", "latest", other, OCI_MANIFEST)
    assert response.status == 403
    assert "overwrite" in (await response.json())["errors"][0]["message"]
    async with alice.get("/v2/team/app/manifests/latest") as got:
        assert got.headers["Docker-Content-Digest"] == digest  # untouched
    # A new tag for the same content is fine; ops may move the tag.
    assert (await put_manifest(alice, "team/app", "v2", other, OCI_MANIFEST)).status == 201
    assert (await put_manifest(ops, "team/app", "latest", other, OCI_MANIFEST)).status == 201


async def test_immutable_tags_cannot_move_or_be_deleted_even_by_ops(clients: Any) -> None:
    ops = await clients.as_("ops")
    await push_image(ops, "team/release/app", "v1.0")
    other = image_manifest(b"{}", [b"layer one"])
    await push_blob(ops, "team/release/app", b"{}")
    assert (await put_manifest(ops, "team/release/app", "v1.0", other, OCI_MANIFEST)).status == 403
    async with ops.delete("/v2/team/release/app/manifests/v1.0") as response:
        assert response.status == 403
    # Spelled with percent-escapes (sent byte for byte) the tag is the same tag to the handler: still immutable.
    login = f"Authorization: {basic('ops', PASSWORDS['ops'])}\r\nContent-Type: {OCI_MANIFEST}\r\n"
    escaped = await raw_request(ops, "PUT", "/v2/team/release/app/manifests/%76%31%2e0", other, login)
    assert escaped.status == 403
    escaped = await raw_request(ops, "DELETE", "/v2/team/release/app/manifests/%76%31.0", b"", login)
    assert escaped.status == 403
    async with ops.get("/v2/team/release/app/manifests/v1.0") as response:
        assert response.status == 200 and response.headers["Docker-Content-Digest"] != digest_of(other)
    assert (await put_manifest(ops, "team/release/app", "edge", other, OCI_MANIFEST)).status == 201
    assert (await put_manifest(ops, "team/release/app", "edge", b"x" * 10 + other[10:], OCI_MANIFEST)).status != 403


async def test_concurrent_pushes_to_an_immutable_tag_leave_exactly_one_winner(clients: Any) -> None:
    """The tag-move check and the tag write are one step: eight different manifests PUT at the same moment
    to a new immutable tag (and to a tag alice may create but not overwrite) give one 201 and seven 403
    DENIED, and the tag then names the winner. (Checked apart from the write, all eight passed the check,
    because the tag did not exist yet, and all eight were 201: the last writer silently moved the tag.)"""
    ops, alice = await clients.as_("ops"), await clients.as_("alice")
    for client, name, tag in ((ops, "team/release/app", "v9"), (alice, "team/app", "race")):
        bodies = []
        for index in range(8):
            config = b'{"architecture":"amd64","os":"linux","n":%d}' % index
            await push_blob(client, name, config)
            await push_blob(client, name, b"layer one")
            bodies.append(image_manifest(config, [b"layer one"]))
        responses = await asyncio.gather(*(put_manifest(client, name, tag, body, OCI_MANIFEST) for body in bodies))
        statuses = [response.status for response in responses]
        assert sorted(statuses) == [201] + [403] * 7, statuses
        winner = bodies[statuses.index(201)]
        for response in responses:
            if response.status == 403:
                assert await error_codes(response) == ["DENIED"]
        async with client.get(f"/v2/{name}/manifests/{tag}") as got:
            assert got.headers["Docker-Content-Digest"] == digest_of(winner)
            assert await got.read() == winner


async def test_delete_by_tag_needs_delete(clients: Any) -> None:
    alice, ops = await clients.as_("alice"), await clients.as_("ops")
    digest, _ = await push_image(alice, "team/app", "1")
    for path in ("/v2/team/app/manifests/1", f"/v2/team/app/manifests/{digest}",
                 f"/v2/team/app/blobs/{digest_of(b'layer one')}"):
        async with alice.delete(path) as response:
            assert response.status == 403, path
    async with alice.get("/v2/team/app/manifests/1") as response:
        assert response.status == 200
    async with ops.delete("/v2/team/app/manifests/1") as response:
        assert response.status == 202


async def test_mount_from_an_unreadable_repository_is_a_plain_upload(clients: Any) -> None:
    ops, alice = await clients.as_("ops"), await clients.as_("alice")
    secret = b"secret layer bytes"
    digest = await push_blob(ops, "private/vault", secret)
    async with alice.post("/v2/team/app/blobs/uploads/", params={"mount": digest, "from": "private/vault"}) as r:
        assert r.status == 202  # not 201: nothing about private/vault is revealed
        assert "mount" not in r.headers["Location"]
    async with alice.head(f"/v2/team/app/blobs/{digest}") as response:
        assert response.status == 404
    # From a repository alice may pull, the mount happens.
    await push_blob(alice, "team/base", secret)
    async with alice.post("/v2/team/app/blobs/uploads/", params={"mount": digest, "from": "team/base"}) as r:
        assert r.status == 201


async def test_catalog_and_tags_show_only_what_the_caller_may_pull(clients: Any) -> None:
    ops = await clients.as_("ops")
    for name in ("team/app", "public/app", "private/vault"):
        await push_image(ops, name, "1")
    async def catalog(client: Any) -> list[str]:
        async with client.get("/v2/_catalog") as response:
            assert response.status == 200
            return list((await response.json())["repositories"])
    assert await catalog(clients.anonymous) == ["public/app"]
    assert await catalog(await clients.as_("alice")) == ["public/app", "team/app"]
    assert await catalog(await clients.as_("carol")) == ["private/vault", "public/app"]
    async with clients.anonymous.get("/v2/private/vault/tags/list") as response:
        assert response.status == 401
    async with (await clients.as_("alice")).get("/v2/private/vault/tags/list") as response:
        assert response.status == 403
    async with (await clients.as_("carol")).get("/v2/private/vault/tags/list") as response:
        assert (await response.json())["tags"] == ["1"]


async def test_a_huge_n_is_capped(aiohttp_client: Any, tmp_path: Path) -> None:
    config = auth_config(tmp_path)
    config["limits"] = {"page_size_max": 2}
    clients = await start(aiohttp_client, config)
    ops = await clients.as_("ops")
    for tag in ("a", "b", "c"):
        await push_image(ops, "public/app", tag)
    for query in ({"n": "9" * 40}, {"n": str(2**64)}, {"n": "3"}):
        async with clients.anonymous.get("/v2/public/app/tags/list", params=query) as response:
            assert response.status == 200
            assert (await response.json())["tags"] == ["a", "b"]
            assert "Link" in response.headers
        async with ops.get("/v2/_catalog", params=query) as response:
            assert response.status == 200 and len((await response.json())["repositories"]) == 1


async def test_referrers_of_an_image_the_caller_may_not_pull_are_not_listed(clients: Any) -> None:
    ops = await clients.as_("ops")
    digest, _ = await push_image(ops, "private/vault", "1")
    async with clients.anonymous.get(f"/v2/private/vault/referrers/{digest}") as response:
        assert response.status == 401
    async with (await clients.as_("alice")).get(f"/v2/private/vault/referrers/{digest}") as response:
        assert response.status == 403
    async with (await clients.as_("carol")).get(f"/v2/private/vault/referrers/{digest}") as response:
        assert response.status == 200


async def test_mirrored_repositories_are_pull_only_whatever_the_policy_says(clients: Any) -> None:
    ops = await clients.as_("ops")  # the policy grants ops "*" on docker.io/**
    for method, path in (("POST", "/v2/docker.io/library/alpine/blobs/uploads/"),
                         ("PUT", "/v2/docker.io/library/alpine/manifests/3"),
                         ("DELETE", "/v2/docker.io/library/alpine/manifests/3")):
        async with ops.request(method, path, data=b"{}") as response:
            assert response.status == 403, (method, path)
            assert "mirrored" in (await response.json())["errors"][0]["message"]
    token = await token_for(ops, "repository:docker.io/library/alpine:pull,push,delete")
    assert jwt.decode(token["token"], options={"verify_signature": False})["access"][0]["actions"] == ["pull"]


async def test_health_metrics_and_status_are_answered_before_auth(clients: Any) -> None:
    for path in ("/metrics", "/livez", "/readyz", "/"):
        async with clients.anonymous.get(path) as response:
            assert response.status in (200, 503), path  # readyz: the test's upstream is offline
    ops = await clients.as_("ops")
    await push_image(ops, "private/secret-project", "1")
    await push_image(ops, "public/open-project", "1")
    for name in ("private/secret-project", "public/open-project"):
        async with ops.get(f"/v2/{name}/manifests/1") as response:
            assert response.status == 200
    async with clients.anonymous.get("/") as response:
        page = await response.text()
    assert "public/open-project" in page and "secret-project" not in page  # the open page names no private repo
    async with clients.anonymous.get("/api/replication") as response:
        assert response.status == 401  # the server's own API needs a login...
    async with (await clients.as_("alice")).get("/api/replication") as response:
        assert response.status == 403  # ...of an administrator


async def test_admins_may_use_the_servers_api(aiohttp_client: Any, tmp_path: Path) -> None:
    clients = await start(aiohttp_client, auth_config(tmp_path, admins={"users": ["ops"], "groups": ["ci"]}))
    for user in ("ops", "alice", "bob"):
        async with (await clients.as_(user)).get("/api/replication") as response:
            assert response.status == 200, user
    async with (await clients.as_("carol")).get("/api/replication") as response:
        assert response.status == 403


async def test_every_push_delete_and_denial_is_audited(clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mirror.audit")
    alice, ops = await clients.as_("alice"), await clients.as_("ops")
    digest, _ = await push_image(alice, "team/app", "1")
    async with alice.delete("/v2/team/app/manifests/1") as response:
        assert response.status == 403
    async with ops.delete(f"/v2/team/app/manifests/{digest}") as response:
        assert response.status == 202
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mirror.audit"]
    assert {"user": "alice", "action": "push", "repository": "team/app", "digest": digest, "result": "ok"}.items() <= \
        next(line for line in lines if line["action"] == "push" and line["digest"] == digest).items()
    assert any(line["user"] == "alice" and line["action"] == "delete" and line["result"] == "denied" for line in lines)
    assert any(line["user"] == "ops" and line["action"] == "delete" and line["result"] == "ok" for line in lines)
    blob_pushes = [line for line in lines if line["action"] == "push" and line["digest"] == digest_of(b"layer one")]
    assert blob_pushes and blob_pushes[0]["result"] == "ok"


# -- tokens -----------------------------------------------------------------------------------------


async def test_token_flow_grants_only_what_the_policy_allows(clients: Any) -> None:
    alice = await clients.as_("alice")
    token = await token_for(alice, "repository:team/app:pull,push", "repository:private/vault:pull",
                            "repository:127.0.0.1:5000/x:pull")
    claims = jwt.decode(token["token"], options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    assert claims["sub"] == "alice" and claims["aud"] == "mirror" and token["expires_in"] == 300
    headers = {"Authorization": f"Bearer {token['token']}"}
    async with clients.anonymous.post("/v2/team/app/blobs/uploads/", headers=headers) as response:
        assert response.status == 202
    # The token is limited to its scopes even where alice's password would do more.
    async with clients.anonymous.post("/v2/team/other/blobs/uploads/", headers=headers) as response:
        assert response.status == 401
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    anonymous = await token_for(clients.anonymous, "repository:team/app:pull,push")
    assert jwt.decode(anonymous["token"], options={"verify_signature": False})["access"] == []


async def test_refresh_tokens_for_docker_login_and_revoked_by_a_password_change(clients: Any, tmp_path: Path) -> None:
    bob = await clients.as_("bob")
    token = await token_for(bob, offline_token="true", client_id="docker")
    refresh = token["refresh_token"]
    form = {"grant_type": "refresh_token", "refresh_token": refresh, "service": "mirror", "client_id": "docker",
            "scope": "repository:team/app:pull,push"}
    async with clients.anonymous.post("/auth/token", data=form) as response:
        assert response.status == 200
        body = await response.json()
    assert body["scope"] == "repository:team/app:pull,push"
    async with clients.anonymous.get("/v2/team/app/tags/list",
                                     headers={"Authorization": f"Bearer {body['access_token']}"}) as response:
        assert response.status == 404  # allowed through to the registry: the repository is empty
    # A refresh token is not an access token.
    async with clients.anonymous.get("/v2/", headers={"Authorization": f"Bearer {refresh}"}) as response:
        assert response.status == 401
    (tmp_path / "htpasswd").write_text(f"bob:{hashed('new-password')}\n")
    time.sleep(1.1)
    async with clients.anonymous.post("/auth/token", data=form) as response:
        assert response.status == 401


async def test_expired_token_is_401_and_a_new_one_works(aiohttp_client: Any, tmp_path: Path) -> None:
    clients = await start(aiohttp_client, auth_config(tmp_path, token={"ttl": "1s", "leeway": 0}))
    alice = await clients.as_("alice")
    token = await token_for(alice, "repository:team/app:pull")
    async with clients.anonymous.get("/v2/team/app/tags/list",
                                     headers={"Authorization": f"Bearer {token['token']}"}) as response:
        assert response.status == 404  # valid now (and remembered as verified)...
    time.sleep(2.1)
    async with clients.anonymous.get("/v2/team/app/tags/list",
                                     headers={"Authorization": f"Bearer {token['token']}"}) as response:
        assert response.status == 401  # ...but not past its exp
        challenge = response.headers["WWW-Authenticate"]
        assert 'error="invalid_token"' in challenge
    fresh = await token_for(alice, "repository:team/app:pull")
    async with clients.anonymous.get("/v2/team/app/tags/list",
                                     headers={"Authorization": f"Bearer {fresh['token']}"}) as response:
        assert response.status == 404


def _forge(claims: dict[str, Any], key: Any, alg: str, headers: dict[str, Any]) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


async def test_forged_tokens_are_refused(clients: Any, tmp_path: Path) -> None:
    real = await token_for(await clients.as_("ops"), "repository:private/vault:pull")
    header = jwt.get_unverified_header(real["token"])
    claims = jwt.decode(real["token"], options={"verify_signature": False})
    attacker = ec.generate_private_key(ec.SECP256R1())
    public = attacker.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).decode().rstrip("=")

    jwk = {"kty": "EC", "crv": "P-256", "x": b64(public.x), "y": b64(public.y)}
    forged = [
        _forge(claims, attacker, "ES256", {"jwk": jwk}),  # CVE-2025-24976: a key embedded in the header
        _forge(claims, attacker, "ES256", {"kid": header["kid"]}),  # our kid, another key
        _forge(claims, attacker, "ES256", {"x5c": ["MIIB"]}),
        _forge(claims, attacker, "ES256", {}),
        _forge(claims, "secret-for-hmac-is-long-enough-32b", "HS256", {"kid": header["kid"]}),
        _forge(claims, None, "none", {}),
        real["token"][:-4] + ("AAAA" if not real["token"].endswith("AAAA") else "BBBB"),
        "not-a-jwt",
    ]
    data = tmp_path / "data" / "auth" / "token-signing.pem"
    assert os.stat(data).st_mode & 0o777 == 0o600
    for token in forged:
        async with clients.anonymous.get("/v2/private/vault/tags/list",
                                         headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 401, token
            assert await error_codes(response) == ["UNAUTHORIZED"]
    async with clients.anonymous.get("/v2/private/vault/tags/list",
                                     headers={"Authorization": f"Bearer {real['token']}"}) as response:
        assert response.status == 404  # through to the registry: nothing pushed there yet


async def test_the_signing_key_survives_a_restart(aiohttp_client: Any, tmp_path: Path) -> None:
    first = await start(aiohttp_client, auth_config(tmp_path))
    token = await token_for(await first.as_("ops"), "repository:private/vault:pull")
    second = await start(aiohttp_client, auth_config(tmp_path))
    async with second.anonymous.get("/v2/", headers={"Authorization": f"Bearer {token['token']}"}) as response:
        assert response.status == 200


async def test_basic_challenge_when_configured(aiohttp_client: Any, tmp_path: Path) -> None:
    clients = await start(aiohttp_client, auth_config(tmp_path, challenge="basic"))
    async with clients.anonymous.get("/v2/") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="mirror"'


def test_scope_names_may_carry_a_host_and_port() -> None:
    scopes = parse_scopes(["repository:127.0.0.1:5000/team/app:pull,push", "registry:catalog:* bad",
                           "repository(plugin):x/y:pull"])
    assert [(s.type, s.name, s.actions) for s in scopes] == [
        ("repository", "127.0.0.1:5000/team/app", ("pull", "push")),
        ("registry", "catalog", ("*",)),
        ("repository", "x/y", ("pull",)),
    ]


@pytest.mark.parametrize(
    ("auth", "key"),
    [
        ({"surprise": 1}, "auth.surprise"),
        ({"access": [{"repository": "x/**", "anonymous": ["fly"]}]}, "auth.access[0].anonymous"),
        ({"access": [{"anonymous": ["pull"]}]}, "auth.access[0].repository"),
        ({"users": {"a": {"password_hash": "plain"}}}, "auth.users.a.password_hash"),
        ({"users": {"a": {"password": "x" * 73}}}, "auth.users.a.password"),
        ({"challenge": "digest"}, "auth.challenge"),
        ({"token": {"algorithm": "HS256"}}, "auth.token.algorithm"),
        ({"htpasswd": "/nonexistent/file"}, "auth.htpasswd"),
    ],
)
def test_config_errors_name_the_key(auth: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config_data({"auth": auth})
    assert str(error.value).startswith(key), str(error.value)
    assert "x" * 73 not in str(error.value) and "plain" not in str(error.value)


def test_config_passwords_are_hashed_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALICE_PASSWORD", "from-the-environment")
    config = load_config_data({"auth": {"users": {"alice": {"password": "${ALICE_PASSWORD}"}}}})
    user = config.security.auth.users[0]
    assert user.password_hash.startswith(b"$2b$") and b"from-the-environment" not in user.password_hash
    assert "from-the-environment" not in repr(config) and "$2b$" not in json.dumps(config.to_dict(), default=str)
    assert not load_config_data({}).security.auth.enabled


async def test_robot_create_cli_prints_a_secret_that_logs_in(
    clients: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from mirror.cli import main

    config_file = tmp_path / "mirror.yml"
    config_file.write_text(yaml.safe_dump(auth_config(tmp_path)))
    assert main(["robot", "create", "deployer", "--group", "ci", "--expires", "1d", "--config", str(config_file)]) == 0
    printed = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert printed["username"].strip() == "robot$deployer"
    secret = printed["secret"].strip()
    time.sleep(1.1)
    robot = await clients.login("robot$deployer", secret)
    await push_image(robot, "team/deployed", "1")
    assert main(["robot", "create", "Bad Name", "--config", str(config_file)]) == 2
