"""Token Secrets, to-inject annotations and templates, as the CERN controller's users write them."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import pytest

from agents.token_refresher.spec import (
    CERN_PREFIX,
    OUR_PREFIX,
    Injection,
    SpecError,
    TooLarge,
    is_token_secret,
    parse_to_inject,
    parse_token_secret,
    render,
    rendered_size,
    template_of,
)

TOKEN_JSON = json.dumps(
    {
        "access_token": "AT-secret",
        "refresh_token": "RT-secret",
        "expires_in": 1199,
        "token_type": "Bearer",
    }
)


@dataclass
class FakeToken:
    access_token: str = "AT-secret"
    token_type: str = "Bearer"
    expires_at: float | None = 1_800_000_000.0


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def cern_secret(**data: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "hello-token", "annotations": {f"{CERN_PREFIX}/is-token": "true"}},
        "data": {k: b64(v) for k, v in data.items()},
    }


def test_the_seed_example_pod_parses_with_defaults() -> None:
    annotations = {
        f"{CERN_PREFIX}/to-inject": """
      [
        {
          "secretName": "hello-token",
          "container": "token-printer",
          "owner": 0
        }
      ]"""
    }
    assert parse_to_inject(annotations) == [
        Injection("hello-token", "token-printer", owner=0, group=0, path="/tmp/oauthtk_0")
    ]


def test_our_prefix_and_the_extra_fields() -> None:
    entry = {
        "secretName": "t",
        "container": "c",
        "owner": 1000,
        "group": "100",
        "path": "/home/user/.eos/token",
        "mode": "0440",
        "templateConfigMapName": "oauth-token-eos-template",
    }
    annotations = {
        f"{OUR_PREFIX}/to-inject": json.dumps([entry]),
        f"{CERN_PREFIX}/to-inject": "[]",  # ours wins
    }
    (injection,) = parse_to_inject(annotations)
    assert (injection.owner, injection.group, injection.mode) == (1000, 100, 0o440)
    assert injection.path == "/home/user/.eos/token"
    assert injection.template_config_map == "oauth-token-eos-template"


def test_no_annotation_means_nothing_to_inject() -> None:
    assert parse_to_inject({}) == [] and parse_to_inject(None) == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[{", "not valid JSON"),
        ('{"secretName": "x"}', "JSON list"),
        ('["x"]', "must be an object"),
        ('[{"container": "c"}]', "secretName"),
        ('[{"secretName": "s"}]', "container"),
        ('[{"secretName": "s", "container": "c", "owner": -1}]', "owner"),
        ('[{"secretName": "s", "container": "c", "owner": true}]', "owner"),
        ('[{"secretName": "s", "container": "c", "path": "tmp/x"}]', "absolute"),
        ('[{"secretName": "s", "container": "c", "mode": "rw"}]', "octal"),
        ('[{"secretName": "s", "container": "c", "mode": "0666"}]', "others write"),
        ('[{"secretName": "s", "container": "c", "secretname": "t"}]', "unknown fields"),
    ],
)
def test_malformed_annotations_say_what_is_wrong(raw: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_to_inject({f"{CERN_PREFIX}/to-inject": raw})


def test_token_secret_with_data_and_string_data() -> None:
    secret = cern_secret(oauth=TOKEN_JSON, clientID="my-app", clientSecret="s3cret")
    assert is_token_secret(secret)
    parsed = parse_token_secret(secret)
    assert (parsed.token_key, parsed.client_id, parsed.client_secret) == (
        "oauth",
        "my-app",
        "s3cret",
    )
    assert parsed.token_json == TOKEN_JSON
    assert "s3cret" not in repr(parsed) and "AT-secret" not in repr(parsed)
    also = {
        "metadata": {
            "annotations": {
                f"{OUR_PREFIX}/is-token": "True",
                f"{OUR_PREFIX}/token-url": "https://idp/token",
            }
        },
        "stringData": {"oauth2": TOKEN_JSON, "clientID": "a", "clientSecret": "b"},
    }
    parsed = parse_token_secret(also)
    assert parsed.token_key == "oauth2" and parsed.token_url == "https://idp/token"
    assert is_token_secret(also)


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (cern_secret(clientID="a", clientSecret="b"), "no oauth or oauth2 key"),
        (cern_secret(oauth=TOKEN_JSON, clientSecret="b"), "missing clientID"),
        (cern_secret(oauth=TOKEN_JSON, clientID="a"), "missing clientSecret"),
        ({"data": {"oauth": "%%%"}}, "not base64"),
    ],
)
def test_broken_token_secrets(secret: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        parse_token_secret(secret)
    assert "AT-secret" not in str(err.value)


def test_not_a_token_secret() -> None:
    assert not is_token_secret({"metadata": {"annotations": {f"{CERN_PREFIX}/is-token": "no"}}})
    assert not is_token_secret({"metadata": {}})


def test_render_default_and_the_eos_template() -> None:
    assert render(None, FakeToken()) == b"AT-secret"
    eos = "oauth2:$(ACCESS_TOKEN):auth.cern.ch/auth/realms/cern/protocol/openid-connect/userinfo"
    assert render(eos, FakeToken()) == (
        b"oauth2:AT-secret:auth.cern.ch/auth/realms/cern/protocol/openid-connect/userinfo"
    )
    assert render("$(TOKEN_TYPE) $(EXPIRES_AT) $(EXPIRES_AT_RFC3339)", FakeToken()) == (
        b"Bearer 1800000000 2027-01-15T08:00:00Z"
    )


def test_unknown_template_variable_is_an_error() -> None:
    with pytest.raises(SpecError, match="ACCES_TOKEN"):
        render("$(ACCES_TOKEN)", FakeToken())


def test_template_config_map() -> None:
    assert template_of({"data": {"template": "x"}}, "t") == "x"
    with pytest.raises(SpecError, match="not found"):
        template_of(None, "t")
    with pytest.raises(SpecError, match="no 'template' key"):
        template_of({"data": {"tmpl": "x"}}, "t")


# -- tenant input that cannot be text, and the caps ---------------------------------


LONE_SURROGATE = "\\ud800"  # as the JSON text has it: plain ASCII


@pytest.mark.parametrize("field", ["secretName", "container", "path", "templateConfigMapName"])
def test_a_lone_surrogate_in_an_annotation_field_is_refused_naming_it(field: str) -> None:
    entry = {"secretName": "s", "container": "c", "path": "/tmp/x", field: "/tmp/a"}
    raw = json.dumps([entry]).replace('"/tmp/a"', f'"/tmp/{LONE_SURROGATE}"')
    with pytest.raises(SpecError, match=rf"to-inject\[0\]\.{field} holds a lone surrogate"):
        parse_to_inject({f"{CERN_PREFIX}/to-inject": raw})


def test_a_lone_surrogate_in_a_template_or_secret_is_refused_naming_it() -> None:
    template = json.loads(f'"oauth2:$(ACCESS_TOKEN):{LONE_SURROGATE}"')
    with pytest.raises(SpecError, match="template ConfigMap t holds a lone surrogate"):
        template_of({"data": {"template": template}}, "t")
    with pytest.raises(SpecError, match="template holds a lone surrogate"):
        render(template, FakeToken())
    secret = {"stringData": {"oauth": TOKEN_JSON, "clientID": "a", "clientSecret": "b\ud800"}}
    with pytest.raises(SpecError, match="Secret key clientSecret holds a lone surrogate"):
        parse_token_secret(secret)
    with pytest.raises(SpecError, match="ACCESS_TOKEN holds a lone surrogate"):
        render(None, FakeToken(access_token="x\udfff"))


def test_the_annotation_caps_name_their_limit() -> None:
    entries = [{"secretName": "s", "container": "c", "path": f"/tmp/{i}"} for i in range(17)]
    with pytest.raises(TooLarge, match="17 entries, over the limit of 16 per pod"):
        parse_to_inject({f"{CERN_PREFIX}/to-inject": json.dumps(entries)})
    assert len(parse_to_inject({f"{CERN_PREFIX}/to-inject": json.dumps(entries[:16])})) == 16
    big = json.dumps([{"secretName": "s" * 20_000, "container": "c"}])
    with pytest.raises(TooLarge, match=f"is {len(big)} bytes, over the limit of 16384 bytes"):
        parse_to_inject({f"{CERN_PREFIX}/to-inject": big})


def test_a_second_entry_for_the_same_file_is_refused() -> None:
    entries = [
        {"secretName": "a", "container": "c", "owner": 1000},
        {"secretName": "b", "container": "d", "owner": 1000},
        {"secretName": "b", "container": "c", "path": "/tmp/./oauthtk_1000"},
    ]
    with pytest.raises(SpecError, match=r"to-inject\[2\] writes /tmp/oauthtk_1000 in container c"):
        parse_to_inject({f"{CERN_PREFIX}/to-inject": json.dumps(entries)})


def test_the_rendered_size_is_capped_before_anything_is_expanded() -> None:
    huge = FakeToken(access_token="A" * 600_000)
    template = "$(ACCESS_TOKEN)" * 400
    with pytest.raises(TooLarge, match="expands 400 variables, over the limit of 16"):
        rendered_size(template, huge)
    with pytest.raises(TooLarge, match="600000 bytes, over the limit of 65536 bytes"):
        render(None, huge)
    assert rendered_size("x$(ACCESS_TOKEN)y", FakeToken()) == len(b"xAT-secrety")
    assert render("$(ACCESS_TOKEN)" * 16, FakeToken()) == b"AT-secret" * 16
    at_cap = FakeToken(access_token="é" * (32 << 10))  # 2 bytes each: the cap counts bytes
    assert len(render(None, at_cap)) == 64 << 10
    with pytest.raises(TooLarge, match="65537 bytes"):
        render("x$(ACCESS_TOKEN)", at_cap)
    with pytest.raises(TooLarge, match="template ConfigMap t is 16385 bytes"):
        template_of({"data": {"template": "x" * (16 << 10) + "y"}}, "t")
