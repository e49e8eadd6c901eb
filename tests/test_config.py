"""The cluster file loader: defaults, validation, error context, secrets, servers, addresses."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from backends.errors import ClusterError, ConfigError
from tandem.config import (
    Address,
    ClusterSection,
    Config,
    PersistenceSection,
    ProxySection,
    ServerConfig,
    SessionSection,
    default_config_path,
    load,
    loads,
)

REPO = Path(__file__).resolve().parent.parent
SOURCE = "test-cluster.toml"
SECRET = "hunter2-do-not-print"

SECTIONS: dict[str, type] = {
    "cluster": ClusterSection,
    "session": SessionSection,
    "proxy": ProxySection,
    "persistence": PersistenceSection,
}


# --- helpers --------------------------------------------------------------------------------


def render(value: Any) -> str:
    """A Python value as a TOML value (floats: repr gives TOML's `nan`, `inf`, `1.5`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the ASCII text used here
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {render(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def section(table: str, /, **keys: Any) -> str:
    return f"[{table}]\n" + "".join(f"{k} = {render(v)}\n" for k, v in keys.items())


def server(
    id: str | None = "s1",
    http: str | None = "127.0.0.1:9001",
    replication: str | None = "127.0.0.1:9101",
    **keys: Any,
) -> str:
    """One `[[servers]]` entry; a key given as None is left out."""
    entries = {"id": id, "http": http, "replication": replication, **keys}
    return "[[servers]]\n" + "".join(
        f"{k} = {render(v)}\n" for k, v in entries.items() if v is not None
    )


ONE_SERVER = server()


def load_text(*parts: str, environ: dict[str, str] | None = None) -> Config:
    """Load the parts joined; with no `[[servers]]` part, one valid server is appended."""
    text = "\n".join(parts)
    if "[[servers]]" not in text and "servers" not in text:
        text += "\n" + ONE_SERVER
    return loads(text, source=SOURCE, environ={} if environ is None else environ)


def config_error(*parts: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(*parts, environ=environ)
    return info.value


def assert_names(err: ConfigError, key: str, value: Any = ..., file: str = SOURCE) -> None:
    """The error carries key, value and file as attributes and says them in its message."""
    assert err.key == key
    assert err.file == file
    message = str(err)
    assert message.startswith(f"{key}: ")
    assert f" in {file}" in message
    if value is not ...:
        assert err.value == value
        assert repr(value) in message


# --- the example files ----------------------------------------------------------------------


def test_example_default_toml_loads() -> None:
    path = REPO / "config" / "default.toml"
    cfg = load(path, environ={})
    assert cfg.source == str(path)
    assert cfg.cluster.name == "tandem-demo"
    assert cfg.cluster.secrets == ("change-me",)
    assert cfg.cluster.heartbeat_interval_s == 1.0
    assert cfg.session.cookie_name == "JSESSIONID"
    assert cfg.session.replication == "sync"
    assert cfg.proxy.listen == Address("127.0.0.1", 8080)
    assert cfg.proxy.admin == Address("127.0.0.1", 8081)
    assert cfg.proxy.io_timeout_s == 30.0
    assert cfg.server_ids == ("s1", "s2", "s3")
    assert [s.machine for s in cfg.servers] == ["m1", "m1", "m2"]
    assert cfg.server("s3").http == Address("127.0.0.1", 9003)
    assert cfg.server("s3").replication == Address("127.0.0.1", 9103)


def test_embedded_default_is_the_example_default() -> None:
    embedded = default_config_path()
    assert embedded.is_file()
    assert embedded.read_text(encoding="utf-8") == (REPO / "config" / "default.toml").read_text(
        encoding="utf-8"
    )
    cfg = load(embedded, environ={})
    assert cfg.server_ids == ("s1", "s2", "s3")


def test_load_accepts_str_and_pathlike(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(ONE_SERVER, encoding="utf-8")
    assert load(str(path), environ={}).source == str(path)
    assert load(path, environ={}).source == str(path)


DESIGN_EXAMPLE = """
[cluster]
name = "demo"
secrets = ["change-me"]          # first signs, all verify; env TANDEM_SECRETS overrides
heartbeat_interval_s = 10.0
missed_heartbeats = 3

[session]
cookie_name = "JSESSIONID"
url_rewriting = true
max_inactive_s = 1800
replication = "sync"             # sync | async | none
persistence = "none"             # none | file | sqlite | postgresql | redis

[proxy]
listen = "127.0.0.1:8080"
admin = "127.0.0.1:8081"
connect_timeout_s = 2.0
io_timeout_s = 300.0
max_skip_s = 10.0
retry = "idempotent"             # idempotent | all | none
retry_body_max_bytes = 65536

[persistence]                    # read when session.persistence is not "none"
path = "/var/lib/tandem"         # file: shared directory; sqlite: database file
dsns = ["postgresql://tandem@db1/tandem", "postgresql://tandem@db2/tandem"]  # tried in order
url = "redis://127.0.0.1:6379/0" # redis (a cluster: list every node in `urls`)
mode = "sync"                    # sync | batched
flush_interval_s = 1.0
flush_threshold = 100

[[servers]]
id = "s1"
http = "127.0.0.1:9001"
replication = "127.0.0.1:9101"
machine = "m1"                   # optional; default: the host of http
group = "a"                      # optional replication group
preferred_secondary_group = "b"  # optional
"""


def test_design_example_loads_verbatim() -> None:
    """Every key of the documented cluster file is accepted (the public contract)."""
    cfg = loads(DESIGN_EXAMPLE, source=SOURCE, environ={})
    assert cfg.cluster.name == "demo"
    assert cfg.session.max_inactive_s == 1800.0
    assert isinstance(cfg.session.max_inactive_s, float)
    assert cfg.persistence.dsns == (
        "postgresql://tandem@db1/tandem",
        "postgresql://tandem@db2/tandem",
    )
    assert cfg.persistence.mode == "sync"
    (s1,) = cfg.servers
    assert (s1.machine, s1.group, s1.preferred_secondary_group) == ("m1", "a", "b")


# --- defaults and shape ---------------------------------------------------------------------


def test_documented_defaults() -> None:
    cfg = load_text()
    assert cfg.source == SOURCE
    assert cfg.cluster.secrets == ("change-me",)
    assert cfg.cluster.heartbeat_interval_s == 10.0
    assert cfg.cluster.missed_heartbeats == 3
    assert cfg.session.cookie_name == "JSESSIONID"
    assert cfg.session.url_rewriting is True
    assert cfg.session.max_inactive_s == 1800.0
    assert cfg.session.replication == "sync"
    assert cfg.session.persistence == "none"
    assert cfg.proxy.listen == Address("127.0.0.1", 8080)
    assert cfg.proxy.admin == Address("127.0.0.1", 8081)
    assert cfg.proxy.connect_timeout_s == 2.0
    assert cfg.proxy.io_timeout_s == 300.0
    assert cfg.proxy.max_skip_s == 10.0
    assert cfg.proxy.retry == "idempotent"
    assert cfg.proxy.retry_body_max_bytes == 65536
    assert cfg.persistence.mode == "sync"
    assert cfg.persistence.flush_interval_s == 1.0
    assert cfg.persistence.flush_threshold == 100


def test_design_keys_are_all_fields() -> None:
    """The keys named in the design are fields of the dataclasses (never renamed)."""
    raw = tomllib.loads(DESIGN_EXAMPLE)
    for name, cls in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(raw[name]) <= fields, name
    assert set(raw["servers"][0]) <= {f.name for f in dataclasses.fields(ServerConfig)}


def _as_toml_value(value: Any) -> Any:
    if isinstance(value, Address):
        return str(value)
    if value is None:
        return "off"
    if isinstance(value, tuple):
        return list(value)
    return value


@pytest.mark.parametrize(
    ("name", "field"),
    [(name, f) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)],
    ids=lambda x: x if isinstance(x, str) else x.name,
)
def test_every_key_accepts_its_own_default(name: str, field: dataclasses.Field[Any]) -> None:
    """Writing any key with its default value loads to the same value (all keys are loadable)."""
    cfg = load_text(section(name, **{field.name: _as_toml_value(field.default)}))
    got = getattr(getattr(cfg, name), field.name)
    assert got == field.default
    assert type(got) is type(field.default)


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(lambda c: c, id="Config"),
        pytest.param(lambda c: c.cluster, id="cluster"),
        pytest.param(lambda c: c.session, id="session"),
        pytest.param(lambda c: c.proxy, id="proxy"),
        pytest.param(lambda c: c.persistence, id="persistence"),
        pytest.param(lambda c: c.servers[0], id="server"),
        pytest.param(lambda c: c.servers[0].http, id="address"),
    ],
)
def test_config_objects_are_frozen(obj: Any) -> None:
    target = obj(load_text())
    first = dataclasses.fields(target)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(target, first, None)


def test_collections_are_immutable_tuples() -> None:
    cfg = load_text(
        section("cluster", secrets=["a", "b"]),
        section("persistence", dsns=["postgresql://x/y"], urls=["redis://a", "redis://b"]),
    )
    assert cfg.cluster.secrets == ("a", "b")
    assert cfg.persistence.dsns == ("postgresql://x/y",)
    assert cfg.persistence.urls == ("redis://a", "redis://b")
    assert isinstance(cfg.servers, tuple)


def test_int_given_for_float_key_becomes_float() -> None:
    cfg = load_text(section("cluster", heartbeat_interval_s=5))
    assert cfg.cluster.heartbeat_interval_s == 5.0
    assert isinstance(cfg.cluster.heartbeat_interval_s, float)


def test_single_string_for_a_list_key_is_a_one_element_list() -> None:
    cfg = load_text(section("cluster", secrets="only"), section("persistence", dsns="pg://a"))
    assert cfg.cluster.secrets == ("only",)
    assert cfg.persistence.dsns == ("pg://a",)


# --- unknown keys and sections --------------------------------------------------------------


@pytest.mark.parametrize("name", [*SECTIONS, "servers"])
def test_unknown_key_in_every_section_names_dotted_key_value_and_file(name: str) -> None:
    if name == "servers":
        err = config_error(server(colour="blue"))
        assert_names(err, "servers[0].colour", "blue")
    else:
        err = config_error(section(name, colour="blue"))
        assert_names(err, f"{name}.colour", "blue")
    assert "unknown" in str(err)


def test_unknown_key_in_a_later_server_names_its_index() -> None:
    err = config_error(
        server(),
        server("s2", "127.0.0.1:9002", "127.0.0.1:9102", weight=3),
    )
    assert_names(err, "servers[1].weight", 3)


def test_misspelled_key_is_not_silently_ignored() -> None:
    err = config_error(section("proxy", conect_timeout_s=5.0))
    assert_names(err, "proxy.conect_timeout_s", 5.0)


def test_unknown_section_is_an_error() -> None:
    err = config_error(section("logging", level="debug"))
    assert_names(err, "logging", {"level": "debug"})


def test_unknown_top_level_key_is_an_error() -> None:
    err = config_error('name = "demo"\n')
    assert_names(err, "name", "demo")


def test_unknown_key_error_names_the_file_given_to_load(tmp_path: Path) -> None:
    path = tmp_path / "prod.toml"
    path.write_text(section("session", cookie="x") + ONE_SERVER, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert_names(info.value, "session.cookie", "x", file=str(path))


@pytest.mark.parametrize("name", list(SECTIONS))
def test_section_that_is_not_a_table(name: str) -> None:
    err = config_error(f"{name} = 5\n")
    assert_names(err, name, 5)


# --- bad types ------------------------------------------------------------------------------

BAD_TYPES = [
    ("cluster", "name", 5),
    ("cluster", "heartbeat_interval_s", "10"),
    ("cluster", "heartbeat_interval_s", True),
    ("cluster", "missed_heartbeats", 2.5),
    ("cluster", "missed_heartbeats", "3"),
    ("cluster", "replication_timeout_s", [1.0]),
    ("session", "cookie_name", 5),
    ("session", "url_rewriting", "yes"),
    ("session", "url_rewriting", 1),
    ("session", "max_inactive_s", "30m"),
    ("session", "replication", True),
    ("session", "cookie_secure", "false"),
    ("proxy", "listen", 8080),
    ("proxy", "listen", ["127.0.0.1", 8080]),
    ("proxy", "admin", False),
    ("proxy", "admin", 8081),
    ("proxy", "connect_timeout_s", False),
    ("proxy", "retry_body_max_bytes", "64k"),
    ("proxy", "retry_body_max_bytes", 1.5),
    ("proxy", "health_rise", True),
    ("persistence", "path", 1),
    ("persistence", "dsns", [1, 2]),
    ("persistence", "dsns", {"a": "b"}),
    ("persistence", "urls", 5),
    ("persistence", "flush_threshold", 1.5),
]


@pytest.mark.parametrize(("name", "key", "value"), BAD_TYPES)
def test_bad_type_is_rejected_naming_the_key(name: str, key: str, value: Any) -> None:
    err = config_error(section(name, **{key: value}))
    assert_names(err, f"{name}.{key}", value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("id", 1),
        ("http", 9001),
        ("replication", True),
        ("machine", 1),
        ("group", ["a"]),
        ("preferred_secondary_group", 2),
    ],
)
def test_bad_type_in_a_server_is_rejected_naming_the_key(key: str, value: Any) -> None:
    err = config_error(server(**{key: value}))
    assert_names(err, f"servers[0].{key}", value)


def test_ints_must_be_whole_numbers() -> None:
    err = config_error(section("cluster", missed_heartbeats=2.0))
    assert_names(err, "cluster.missed_heartbeats", 2.0)
    assert "whole number" in str(err)


# --- out-of-range values --------------------------------------------------------------------

OUT_OF_RANGE = [
    ("cluster", "heartbeat_interval_s", 0),
    ("cluster", "heartbeat_interval_s", -1.0),
    ("cluster", "heartbeat_interval_s", -math.inf),
    ("cluster", "missed_heartbeats", 0),
    ("cluster", "missed_heartbeats", 1),  # a lease lasts one heartbeat less: none at 1
    ("cluster", "replication_timeout_s", 0.0),
    ("cluster", "peer_connect_timeout_s", -0.1),
    ("session", "max_inactive_s", 0),
    ("session", "async_flush_threshold", 0),
    ("session", "async_flush_interval_s", 0.0),
    ("proxy", "connect_timeout_s", 0.0),
    ("proxy", "io_timeout_s", -5.0),
    ("proxy", "max_skip_s", -0.5),
    ("proxy", "retry_body_max_bytes", -1),
    ("proxy", "max_head_bytes", 1023),
    ("proxy", "max_body_bytes", -1),
    ("proxy", "keepalive_s", 0),
    ("proxy", "health_interval_s", -1.0),
    ("proxy", "health_rise", 0),
    ("proxy", "health_fall", 0),
    ("persistence", "flush_interval_s", 0.0),
    ("persistence", "flush_threshold", 0),
]


@pytest.mark.parametrize(("name", "key", "value"), OUT_OF_RANGE)
def test_out_of_range_value_is_rejected_naming_the_key(name: str, key: str, value: Any) -> None:
    err = config_error(section(name, **{key: value}))
    assert_names(err, f"{name}.{key}", value)
    assert "must be >" in str(err) or "finite" in str(err)


BOUNDARIES = [
    ("cluster", "missed_heartbeats", 2),
    ("cluster", "heartbeat_interval_s", 0.001),
    ("proxy", "max_skip_s", 0.0),
    ("proxy", "retry_body_max_bytes", 0),
    ("proxy", "max_head_bytes", 1024),
    ("proxy", "max_body_bytes", 0),
    ("proxy", "health_interval_s", 0),
    ("session", "max_inactive_s", 1),
    ("persistence", "flush_threshold", 1),
]


@pytest.mark.parametrize(("name", "key", "value"), BOUNDARIES)
def test_boundary_value_is_accepted(name: str, key: str, value: Any) -> None:
    cfg = load_text(section(name, **{key: value}))
    assert getattr(getattr(cfg, name), key) == value


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("cluster", "heartbeat_interval_s"),
        ("session", "max_inactive_s"),
        ("proxy", "connect_timeout_s"),
        ("proxy", "max_skip_s"),
    ],
)
def test_nan_duration_is_rejected(name: str, key: str) -> None:
    err = config_error(section(name, **{key: math.nan}))
    assert err.key == f"{name}.{key}"


# --- bad choices ----------------------------------------------------------------------------

CHOICES = {
    ("session", "replication"): ("sync", "async", "none"),
    ("session", "persistence"): ("none", "file", "sqlite", "postgresql", "redis"),
    ("session", "cookie_samesite"): ("Lax", "Strict", "None"),
    ("session", "foreign_requests"): ("forward", "take_over"),
    ("proxy", "retry"): ("idempotent", "all", "none"),
    ("persistence", "mode"): ("sync", "batched"),
}

BAD_CHOICES = [
    ("session", "replication", "maybe"),
    ("session", "replication", "SYNC"),
    ("session", "replication", ""),
    ("session", "persistence", "mongodb"),
    ("session", "cookie_samesite", "lax"),
    ("session", "foreign_requests", "proxy"),
    ("session", "foreign_requests", "take-over"),
    ("proxy", "retry", "sometimes"),
    ("persistence", "mode", "lazy"),
]


@pytest.mark.parametrize(("name", "key", "value"), BAD_CHOICES)
def test_bad_choice_is_rejected_naming_key_and_the_choices(name: str, key: str, value: str) -> None:
    err = config_error(section(name, **{key: value}))
    assert_names(err, f"{name}.{key}", value)
    for allowed in CHOICES[(name, key)]:
        assert allowed in str(err)


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [(n, k, v) for (n, k), allowed in CHOICES.items() for v in allowed],
)
def test_every_documented_choice_is_accepted(name: str, key: str, value: str) -> None:
    cfg = load_text(section(name, **{key: value}))
    assert getattr(getattr(cfg, name), key) == value


# --- cookie name ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["JSESS ION", "", "a;b", "a=b", "a.b", "x" * 65, "sés"])
def test_bad_cookie_name_is_rejected(value: str) -> None:
    err = config_error(section("session", cookie_name=value))
    assert_names(err, "session.cookie_name", value)


@pytest.mark.parametrize("value", ["SESSION_ID-2", "x", "x" * 64])
def test_good_cookie_name_is_accepted(value: str) -> None:
    assert load_text(section("session", cookie_name=value)).session.cookie_name == value


# --- secrets --------------------------------------------------------------------------------


def test_first_secret_first_order_kept() -> None:
    cfg = load_text(section("cluster", secrets=["new", "old", "older"]))
    assert cfg.cluster.secrets == ("new", "old", "older")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([], id="empty-list"),
        pytest.param([SECRET, ""], id="empty-member"),
        pytest.param("", id="empty-string"),
        pytest.param([SECRET, 5], id="non-string-member"),
        pytest.param(5, id="number"),
        pytest.param({"k": SECRET}, id="table"),
    ],
)
def test_bad_secrets_are_rejected_without_echoing_them(value: Any) -> None:
    err = config_error(section("cluster", secrets=value))
    assert err.key == "cluster.secrets"
    assert err.file == SOURCE
    assert err.value == "***"
    assert SECRET not in str(err)
    assert SECRET not in repr(err.args)


def test_tandem_secrets_overrides_the_file() -> None:
    cfg = load_text(
        section("cluster", secrets=["from-file"]),
        environ={"TANDEM_SECRETS": "new,old"},
    )
    assert cfg.cluster.secrets == ("new", "old")


def test_tandem_secrets_trims_whitespace_and_drops_empty_entries() -> None:
    cfg = load_text(environ={"TANDEM_SECRETS": "  new , old\t,, ,older  "})
    assert cfg.cluster.secrets == ("new", "old", "older")


def test_tandem_secrets_applies_when_the_file_has_none() -> None:
    cfg = load_text(section("cluster", name="x"), environ={"TANDEM_SECRETS": "only"})
    assert cfg.cluster.secrets == ("only",)


def test_empty_tandem_secrets_leaves_the_file_secrets() -> None:
    cfg = load_text(section("cluster", secrets=["from-file"]), environ={"TANDEM_SECRETS": ""})
    assert cfg.cluster.secrets == ("from-file",)


def test_tandem_secrets_with_only_separators_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_text(section("cluster", secrets=[SECRET]), environ={"TANDEM_SECRETS": " , ,"})
    err = info.value
    assert err.key == "TANDEM_SECRETS"
    assert err.value == "***"
    assert SECRET not in str(err)


def test_other_environment_variables_are_ignored() -> None:
    cfg = load_text(environ={"TANDEM_SECRET": "typo", "SECRETS": "x"})
    assert cfg.cluster.secrets == ("change-me",)


def test_process_environment_is_read_when_no_environ_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TANDEM_SECRETS", "from-process-env, second")
    assert loads(ONE_SERVER).cluster.secrets == ("from-process-env", "second")
    # An explicit mapping replaces the process environment entirely.
    assert loads(ONE_SERVER, environ={}).cluster.secrets == ("change-me",)


def test_load_passes_environ_through(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(ONE_SERVER, encoding="utf-8")
    assert load(path, environ={"TANDEM_SECRETS": "k"}).cluster.secrets == ("k",)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f'[cluster]\nsecret = "{SECRET}"\n', id="misspelled-key"),
        pytest.param(f'secrets = ["{SECRET}"]\n[cluster]\nname = "x"\n', id="above-header"),
    ],
)
def test_misplaced_secret_is_not_echoed(text: str) -> None:
    err = config_error(text)
    assert SECRET not in str(err)
    assert SECRET not in repr(err.value)


# --- servers --------------------------------------------------------------------------------


def test_missing_servers_is_an_error() -> None:
    err = config_error("servers = []\n", section("cluster", name="x"))
    assert_names(err, "servers", [])
    with pytest.raises(ConfigError) as info:
        loads(section("cluster", name="x"), source=SOURCE, environ={})
    assert_names(info.value, "servers", [])


def test_servers_must_be_an_array_of_tables() -> None:
    err = config_error('[servers]\nid = "s1"\n')
    assert_names(err, "servers", {"id": "s1"})
    err = config_error('servers = ["s1"]\n')
    assert_names(err, "servers[0]", "s1")


@pytest.mark.parametrize("missing", ["id", "http", "replication"])
def test_required_server_key_missing(missing: str) -> None:
    err = config_error(server(**{missing: None}))
    assert_names(err, f"servers[0].{missing}", None)
    assert "missing" in str(err)


def test_servers_keep_file_order() -> None:
    cfg = load_text(
        server("zeta", "127.0.0.1:9003", "127.0.0.1:9103"),
        server("alpha", "127.0.0.1:9001", "127.0.0.1:9101"),
        server("mid", "127.0.0.1:9002", "127.0.0.1:9102"),
    )
    assert cfg.server_ids == ("zeta", "alpha", "mid")


def test_duplicate_server_id_is_rejected() -> None:
    err = config_error(
        server("s1", "127.0.0.1:9001", "127.0.0.1:9101"),
        server("s1", "127.0.0.1:9002", "127.0.0.1:9102"),
    )
    assert_names(err, "servers[1].id", "s1")
    assert "duplicate" in str(err)


@pytest.mark.parametrize(
    ("second", "key", "owner"),
    [
        pytest.param(
            ("127.0.0.1:9001", "127.0.0.1:9102"), "servers[1].http", "s1.http", id="http-http"
        ),
        pytest.param(
            ("127.0.0.1:9002", "127.0.0.1:9101"),
            "servers[1].replication",
            "s1.replication",
            id="repl-repl",
        ),
        pytest.param(
            ("127.0.0.1:9101", "127.0.0.1:9102"),
            "servers[1].http",
            "s1.replication",
            id="http-repl",
        ),
        pytest.param(
            ("127.0.0.1:9002", "127.0.0.1:9001"),
            "servers[1].replication",
            "s1.http",
            id="repl-http",
        ),
    ],
)
def test_duplicate_address_across_servers_is_rejected(
    second: tuple[str, str], key: str, owner: str
) -> None:
    err = config_error(server("s1"), server("s2", *second))
    assert err.key == key
    assert err.file == SOURCE
    assert owner in str(err)


def test_same_address_for_http_and_replication_is_rejected() -> None:
    err = config_error(server("s1", "127.0.0.1:9001", "127.0.0.1:9001"))
    assert_names(err, "servers[0].replication", "127.0.0.1:9001")
    assert "s1.http" in str(err)


def test_duplicate_address_is_detected_after_normalisation() -> None:
    err = config_error(server("s1"), server("s2", "127.0.0.1:09001", "127.0.0.1:9102"))
    assert_names(err, "servers[1].http", "127.0.0.1:9001")


def test_duplicate_ipv6_address_is_rejected() -> None:
    err = config_error(
        server("s1", "[::1]:9001", "[::1]:9101"), server("s2", "[::1]:9001", "[::1]:9102")
    )
    assert_names(err, "servers[1].http", "[::1]:9001")


def test_same_port_on_different_hosts_is_fine() -> None:
    cfg = load_text(
        server("s1", "10.0.0.1:9001", "10.0.0.1:9101"),
        server("s2", "10.0.0.2:9001", "10.0.0.2:9101"),
    )
    assert cfg.server_ids == ("s1", "s2")


@pytest.mark.parametrize(
    "bad_id", ["s!1", "s.1", "NONE", "", "s 1", "s/1", "s:1", "é", "x" * 65, "s1\n"]
)
def test_invalid_server_id_is_rejected(bad_id: str) -> None:
    err = config_error(server(bad_id))
    assert_names(err, "servers[0].id", bad_id)


@pytest.mark.parametrize("good_id", ["a", "S_1-b", "x" * 64, "0", "-", "none", "None"])
def test_valid_server_id_is_accepted(good_id: str) -> None:
    # Only the exact "NONE" is reserved: it is what the route token writes for "no secondary".
    assert load_text(server(good_id)).server_ids == (good_id,)


def test_machine_defaults_to_the_host_of_the_http_address() -> None:
    cfg = load_text(
        server("s1", "127.0.0.1:9001", "127.0.0.1:9101"),
        server("s2", "127.0.0.1:9002", "127.0.0.1:9102", machine="rack-7"),
        server("s3", "127.0.0.3:9003", "127.0.0.3:9103", machine=""),
        server("s4", "[::1]:9004", "[::1]:9104"),
    )
    assert [s.machine for s in cfg.servers] == ["127.0.0.1", "rack-7", "127.0.0.3", "::1"]


def test_group_and_preferred_secondary_group_default_to_empty() -> None:
    s1 = load_text(server()).servers[0]
    assert (s1.group, s1.preferred_secondary_group) == ("", "")
    s1 = load_text(server(group="a", preferred_secondary_group="b")).servers[0]
    assert (s1.group, s1.preferred_secondary_group) == ("a", "b")


def test_server_lookup_by_id() -> None:
    cfg = load_text(
        server("s1", "127.0.0.1:9001", "127.0.0.1:9101"),
        server("s2", "127.0.0.1:9002", "127.0.0.1:9102"),
    )
    assert cfg.server("s2").http == Address("127.0.0.1", 9002)
    with pytest.raises(ConfigError) as info:
        cfg.server("s9")
    err = info.value
    assert_names(err, "servers.id", "s9")
    assert "s1, s2" in str(err)


# --- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9001", "127.0.0.1", 9001),
        ("localhost:1", "localhost", 1),
        ("backend-1.example.com:65535", "backend-1.example.com", 65535),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("[::1]:9001", "::1", 9001),
        ("[2001:db8::42]:443", "2001:db8::42", 443),
        ("[::ffff:127.0.0.1]:8080", "::ffff:127.0.0.1", 8080),
    ],
)
def test_address_parse(text: str, host: str, port: int) -> None:
    addr = Address.parse(text)
    assert addr == Address(host, port)
    assert str(addr) == text
    assert Address.parse(str(addr)) == addr


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1",
        "127.0.0.1:",
        ":9001",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:99999",
        "127.0.0.1:123456",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1:90 01",
        " 127.0.0.1:9001",
        "127.0.0.1:9001 ",
        "::1:9001",
        "[::1]",
        "[::1]9001",
        "[::1]:",
        "[::1]:0",
        "[zz::1]:80",
        "[]:80",
        "host:80:81",
        "http://127.0.0.1:80",
    ],
)
def test_address_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Address.parse(text)


def test_ipv6_server_addresses_load() -> None:
    (s1,) = load_text(server("s1", "[::1]:9001", "[::1]:9101")).servers
    assert s1.http == Address("::1", 9001)
    assert s1.replication == Address("::1", 9101)
    assert str(s1.http) == "[::1]:9001"


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("http", "127.0.0.1:70000"),
        ("http", "127.0.0.1:0"),
        ("replication", "127.0.0.1"),
        ("replication", "::1:9101"),
        ("http", "[::1]:99999"),
    ],
)
def test_bad_server_address_is_rejected_naming_the_key(where: str, value: str) -> None:
    err = config_error(server(**{where: value}))
    assert_names(err, f"servers[0].{where}", value)


@pytest.mark.parametrize("value", ["8080", "off", ""])
def test_bad_proxy_listen_is_rejected(value: str) -> None:
    err = config_error(section("proxy", listen=value))
    assert_names(err, "proxy.listen", value)


def test_proxy_listen_ipv6() -> None:
    assert load_text(section("proxy", listen="[::]:8080")).proxy.listen == Address("::", 8080)


@pytest.mark.parametrize("value", ["off", "none", ""])
def test_proxy_admin_can_be_off(value: str) -> None:
    assert load_text(section("proxy", admin=value)).proxy.admin is None


def test_proxy_admin_address() -> None:
    cfg = load_text(section("proxy", admin="[::1]:9999"))
    assert cfg.proxy.admin == Address("::1", 9999)


@pytest.mark.parametrize("value", ["bogus", "OFF-ish"])
def test_bad_proxy_admin_is_rejected(value: str) -> None:
    err = config_error(section("proxy", admin=value))
    assert_names(err, "proxy.admin", value)


# --- reading the file -----------------------------------------------------------------------


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert_names(info.value, "<file>", str(path), file=str(path))
    assert isinstance(info.value.__cause__, OSError)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[cluster\nname = ", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert_names(info.value, "<file>", file=str(path))
    assert "TOML" in str(info.value)


def test_invalid_toml_from_text_names_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        loads("x = = 1", source="inline", environ={})
    assert_names(info.value, "<file>", file="inline")


def test_config_error_is_a_value_error_and_a_cluster_error() -> None:
    err = config_error(section("session", replication="maybe"))
    assert isinstance(err, ValueError)
    assert isinstance(err, ClusterError)
    assert str(err) == (
        f"session.replication: must be one of sync, async, none (got 'maybe') in {SOURCE}"
    )


def test_default_source_is_memory() -> None:
    with pytest.raises(ConfigError) as info:
        loads(section("session", replication="maybe") + ONE_SERVER, environ={})
    assert info.value.file == "<memory>"
    assert loads(ONE_SERVER, environ={}).source == "<memory>"


def test_io_timeout_must_exceed_the_replication_timeout() -> None:
    from backends.errors import ConfigError
    from tandem.config import loads

    text = """
[cluster]
replication_timeout_s = 2.0
[proxy]
io_timeout_s = 1.5
[[servers]]
id = "s1"
http = "127.0.0.1:9001"
replication = "127.0.0.1:9101"
"""
    with pytest.raises(ConfigError) as err:
        loads(text, source="dup.toml")
    assert err.value.key == "proxy.io_timeout_s" and "replication_timeout_s" in str(err.value)
    assert loads(text.replace("1.5", "2.5")).proxy.io_timeout_s == 2.5
