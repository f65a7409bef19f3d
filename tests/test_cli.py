"""The ``credit-guard`` command line on both databases, called in-process through ``main``.

These tests are plain sync functions: ``main`` starts its own event loop, as it does when
the console script runs. State is checked by reading the database through a fresh guard,
never by trusting the command's own output alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import pytest
from sqlalchemy import update

from credit_guard import CreditGuard, DuplicateFeature, InvalidPricing
from credit_guard.cli import main
from credit_guard.models import FeaturePricing
from credit_guard.schema import accounts

from .conftest import ledger_rows, reset_postgres

T = TypeVar("T")

IMAGE = "seedream_text_to_image"
VIDEO = "kling_image_to_video"


def with_guard(url: str, work: Callable[[CreditGuard], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh guard in its own event loop (the tests themselves are sync)."""

    async def go() -> T:
        async with CreditGuard(url) as guard:
            return await work(guard)

    return anyio.run(go)


def prices(url: str) -> dict[str, FeaturePricing]:
    return {p.feature_key: p for p in with_guard(url, lambda g: g.list_pricing())}


class Cli:
    """``main`` bound to one database, returning (exit code, stdout, stderr)."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--database-url", self.url, *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *args: str) -> str:
        code, out, err = self(*args)
        assert code == 0, err
        return out


@pytest.fixture
def cli(db_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    """A CLI on an initialised, empty database."""
    run = Cli(db_url, capsys)
    run.ok("init")
    if db_url.startswith("postgresql"):
        with_guard(db_url, reset_postgres)
    return run


def add_image_and_video(cli: Cli) -> None:
    cli.ok(
        "pricing", "add", "--key", IMAGE, "--name", "SeeDream Text to Image", "--category", "Image", "--credits", "5"
    )
    cli.ok("pricing", "add", "--key", VIDEO, "--name", "Kling", "--category", "Video", "--credits", "20", "--inactive")


def test_init_is_idempotent_and_keeps_existing_data(cli: Cli) -> None:
    add_image_and_video(cli)
    out = cli.ok("init")
    assert out.startswith("schema ready at ")
    for table in ("credit_guard_accounts", "credit_guard_feature_pricing", "credit_guard_ledger"):
        assert table in out
    assert set(prices(cli.url)) == {IMAGE, VIDEO}


def test_add_list_update_remove(cli: Cli) -> None:
    code, out, _ = cli("pricing", "add", "--key", IMAGE, "--name", "SeeDream", "--category", "Image", "--credits", "5")
    assert code == 0
    image = prices(cli.url)[IMAGE]
    assert out == f"created {IMAGE} id={image.id} credits=5 active=yes\n"
    cli.ok("pricing", "add", "--key", VIDEO, "--name", "Kling", "--category", "Video", "--credits", "20", "--inactive")
    assert prices(cli.url)[VIDEO].is_active is False

    table = cli.ok("pricing", "list").splitlines()
    assert table[0].split() == ["FEATURE_KEY", "CREDITS", "ACTIVE", "CATEGORY", "NAME", "ID"]
    assert [line.split() for line in table[1:]] == [
        [IMAGE, "5", "yes", "Image", "SeeDream", image.id],
        [VIDEO, "20", "no", "Video", "Kling", prices(cli.url)[VIDEO].id],
    ]
    assert [p["feature_key"] for p in json.loads(cli.ok("pricing", "list", "--active", "--json"))] == [IMAGE]
    assert [p["feature_key"] for p in json.loads(cli.ok("pricing", "list", "--inactive", "--json"))] == [VIDEO]
    assert json.loads(cli.ok("pricing", "list", "--category", "Nope", "--json")) == []

    # By key, then by id; fields not named stay as they were.
    assert cli.ok("pricing", "update", IMAGE, "--credits", "7", "--inactive").startswith(f"updated {IMAGE} ")
    cli.ok("pricing", "update", image.id, "--description", "One image", "--name", "SeeDream 4")
    after = prices(cli.url)[IMAGE]
    assert (after.id, after.credits, after.is_active, after.feature_name, after.description, after.category) == (
        image.id,
        7,
        False,
        "SeeDream 4",
        "One image",
        "Image",
    )

    assert cli.ok("pricing", "remove", VIDEO, "--yes").startswith(f"removed {VIDEO} ")
    assert set(prices(cli.url)) == {IMAGE}


def test_remove_without_yes_on_a_pipe_refuses_and_keeps_the_row(cli: Cli) -> None:
    add_image_and_video(cli)
    code, out, err = cli("pricing", "remove", IMAGE)
    assert (code, out) == (1, "")
    assert "pass --yes" in err
    assert IMAGE in prices(cli.url)


def test_pricing_add_takes_its_key_positionally_like_the_other_commands(cli: Cli) -> None:
    """Issue 23: ``pricing add --key K`` while update/remove take the key positionally."""
    cli.ok("pricing", "add", IMAGE, "--name", "SeeDream", "--category", "Image", "--credits", "5")
    assert prices(cli.url)[IMAGE].credits == 5
    code, _, err = cli("pricing", "add", "--name", "Kling", "--category", "Video", "--credits", "20")
    assert code == 2 and "the feature key is required" in err
    code, _, err = cli("pricing", "add", VIDEO, "--key", "other", "--name", "K", "--category", "V", "--credits", "2")
    assert code == 2 and "two feature keys given" in err
    assert set(prices(cli.url)) == {IMAGE}


def test_invalid_pricing_names_every_bad_field_and_writes_nothing(cli: Cli) -> None:
    code, out, err = cli("pricing", "add", "--key", "Bad-Key", "--name", " ", "--category", "x", "--credits", "-3")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith("credit-guard: error: invalid pricing: ")
    for field in ("feature_key:", "feature_name:", "credits:"):
        assert field in err
    assert prices(cli.url) == {}


def test_duplicate_key_is_refused(cli: Cli) -> None:
    add_image_and_video(cli)
    code, _, err = cli("pricing", "add", "--key", IMAGE, "--name", "Again", "--category", "x", "--credits", "1")
    assert code == 1
    assert "already exists" in err
    assert prices(cli.url)[IMAGE].feature_name == "SeeDream Text to Image"


@pytest.mark.parametrize(
    "args",
    [
        ("pricing", "update", "no_such_key", "--credits", "3"),
        ("pricing", "remove", "no_such_key", "--yes"),
    ],
)
def test_unknown_key_exits_1_with_its_name(cli: Cli, args: tuple[str, ...]) -> None:
    code, out, err = cli(*args)
    assert (code, out) == (1, "")
    assert err == "credit-guard: error: no pricing with key or id 'no_such_key'\n"


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("fly",),
        ("pricing",),
        ("pricing", "add", "--key", "x_y"),
        ("pricing", "add", "--key", "x_y", "--name", "X", "--category", "c", "--credits", "five"),
        ("pricing", "update", IMAGE),
        ("pricing", "list", "--active", "--inactive"),
        ("grant", "org_1", "0"),
        ("grant", "org_1", "ten"),
        ("usage", "--group-by", "week"),
        ("usage", "--since", "yesterday"),
    ],
)
def test_invalid_arguments_exit_2_and_touch_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    db = tmp_path / "never.db"
    assert main(["--database-url", f"sqlite+aiosqlite:///{db}", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "error:" in err.splitlines()[-1]
    assert not db.exists()


def test_unreachable_or_missing_database_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--database-url", "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere", "balance", "org_1"]) == 1
    assert capsys.readouterr().err.startswith("credit-guard: error: database unavailable at postgresql+asyncpg://")

    missing = tmp_path / "typo.db"
    assert main(["--database-url", f"sqlite+aiosqlite:///{missing}", "pricing", "list"]) == 1
    assert "run `credit-guard init`" in capsys.readouterr().err
    assert not missing.exists(), "a mistyped path must not leave an empty database behind"

    empty = tmp_path / "empty.db"
    empty.touch()
    assert main(["--database-url", f"sqlite+aiosqlite:///{empty}", "pricing", "list"]) == 1
    assert "tables are missing" in capsys.readouterr().err

    assert main(["--database-url", "nonsense", "pricing", "list"]) == 2
    assert "invalid database URL" in capsys.readouterr().err


def test_database_url_comes_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("CREDIT_GUARD_DATABASE_URL", url)
    assert main(["init"]) == 0
    assert main(["grant", "org_env", "9"]) == 0
    capsys.readouterr()
    assert with_guard(url, lambda g: g.get_balance("org_env")) == 9


CSV = """\
feature_key,feature_name,category,credits,description,is_active
seedream_text_to_image,SeeDream Text to Image,Image Generation,5,"One image, 1024x1024",true
kling_image_to_video,Kling Image to Video,Video Generation,20,,no
ai_voice_generation, AI Voice ,AI Voice,2,,
"""


def test_import_csv_creates_every_row(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(CSV)
    out = cli.ok("pricing", "import", str(path))
    assert out.splitlines()[-1] == f"imported 3 rows from {path}: 3 created, 0 updated"
    got = {k: (p.feature_name, p.category, p.credits, p.description, p.is_active) for k, p in prices(cli.url).items()}
    assert got == {
        IMAGE: ("SeeDream Text to Image", "Image Generation", 5, "One image, 1024x1024", True),
        VIDEO: ("Kling Image to Video", "Video Generation", 20, None, False),
        "ai_voice_generation": ("AI Voice", "AI Voice", 2, None, True),
    }


def test_import_json_then_reimport_its_export_with_update_existing(cli: Cli, tmp_path: Path) -> None:
    seed = [
        {"feature_key": IMAGE, "feature_name": "SeeDream", "category": "Image", "credits": 5},
        {"feature_key": VIDEO, "feature_name": "Kling", "category": "Video", "credits": 20, "is_active": False},
    ]
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(seed))
    cli.ok("pricing", "import", str(path))
    assert {k: (p.credits, p.is_active) for k, p in prices(cli.url).items()} == {IMAGE: (5, True), VIDEO: (20, False)}

    # An export (ids and timestamps included) is a valid import file.
    exported = json.loads(cli.ok("pricing", "list", "--json"))
    for row in exported:
        row["credits"] += 1
    path.write_text(json.dumps(exported))
    code, _, err = cli("pricing", "import", str(path))
    assert code == 1
    assert err.count("already exists (pass --update-existing to overwrite)") == 2
    assert {k: p.credits for k, p in prices(cli.url).items()} == {IMAGE: 5, VIDEO: 20}

    before = prices(cli.url)
    out = cli.ok("pricing", "import", str(path), "--update-existing")
    assert out.splitlines()[-1] == f"imported 2 rows from {path}: 0 created, 2 updated"
    after = prices(cli.url)
    assert {k: p.credits for k, p in after.items()} == {IMAGE: 6, VIDEO: 21}
    assert {k: p.id for k, p in after.items()} == {k: p.id for k, p in before.items()}


def test_import_dry_run_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(CSV)
    out = cli.ok("pricing", "import", str(path), "--dry-run")
    assert out.splitlines()[-1] == "dry run: 3 rows valid, 3 to create, 0 to update; nothing written"
    assert prices(cli.url) == {}


def test_import_reports_every_bad_row_and_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    cli.ok("pricing", "add", "--key", "existing_one", "--name", "Old", "--category", "x", "--credits", "1")
    path = tmp_path / "prices.csv"
    path.write_text(
        "feature_key,feature_name,category,credits,description,is_active\n"
        "good_one,Good,Cat,3,,\n"
        "bad_credits,Bad,Cat,lots,,maybe\n"
        "Bad-Key,,Cat,2,,\n"
        "good_one,Twin,Cat,4,,\n"
        "existing_one,Old again,Cat,1,,\n"
        "good_two,Good,Cat,7,,yes,surplus\n"
        "good_three,Good,Cat,8,,\n"
    )
    code, out, err = cli("pricing", "import", str(path))
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert "credit-guard: error: row 2 (line 3): credits: must be an integer" in lines
    assert "credit-guard: error: row 2 (line 3): is_active: must be true or false" in lines
    assert "credit-guard: error: row 3 (line 4): feature_name: is required" in lines
    assert any(line.startswith("credit-guard: error: row 3 (line 4): feature_key: must be lowercase") for line in lines)
    assert "credit-guard: error: row 4 (line 5): feature_key: 'good_one' duplicates row 1" in lines
    assert any(
        line.startswith("credit-guard: error: row 5 (line 6): feature_key: 'existing_one' already") for line in lines
    )
    assert "credit-guard: error: row 6 (line 7): 1 more cell(s) than the header has columns" in lines
    assert lines[-1] == f"credit-guard: error: 5 of 7 rows in {path} are invalid; nothing imported"
    assert not any("row 1 " in line or "row 7 " in line for line in lines)
    assert set(prices(cli.url)) == {"existing_one"}


def test_import_json_reports_rows_that_are_not_objects(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps([{"feature_key": "a_b", "feature_name": "A", "category": "c", "credits": 1}, 3, {}]))
    code, _, err = cli("pricing", "import", str(path))
    assert code == 1
    assert "credit-guard: error: row 2: must be a JSON object, not int\n" in err
    assert "row 3: feature_key: is required" in err
    assert prices(cli.url) == {}

    path.write_text('{"feature_key": "a_b"}')
    assert cli("pricing", "import", str(path))[0] == 1
    path.write_text("[{")
    code, _, err = cli("pricing", "import", str(path))
    assert code == 1
    assert "invalid JSON" in err
    assert cli("pricing", "import", str(tmp_path / "missing.csv"))[2].startswith("credit-guard: error: cannot read")


def test_import_csv_with_unknown_column_is_refused_as_a_whole(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text("feature_key,feature_name,category,credits,colour\na_b,A,c,1,red\n")
    code, _, err = cli("pricing", "import", str(path))
    assert code == 1
    assert "unknown column(s) colour" in err
    assert prices(cli.url) == {}


def test_import_rolls_back_every_row_when_the_database_refuses_one(cli: Cli) -> None:
    """The store's single transaction: a duplicate caught by the UNIQUE index, not by
    validation, undoes the rows already inserted before it."""
    rows = [
        {"feature_key": "first_one", "feature_name": "A", "category": "c", "credits": 1},
        {"feature_key": "twin_key", "feature_name": "B", "category": "c", "credits": 1},
        {"feature_key": "twin_key", "feature_name": "C", "category": "c", "credits": 1},
    ]

    async def import_twins(guard: CreditGuard) -> None:
        with pytest.raises(DuplicateFeature):
            await guard.store.import_pricing(rows)

    with_guard(cli.url, import_twins)
    assert prices(cli.url) == {}


def test_grant_and_balance(cli: Cli) -> None:
    assert cli.ok("grant", "org_1", "100", "--reason", "signup") == "granted 100 to org_1: balance 100\n"
    assert cli.ok("grant", "org_1", "20") == "granted 20 to org_1: balance 120\n"
    assert cli.ok("balance", "org_1") == "120\n"
    assert cli.ok("balance", "org_nobody") == "0\n"
    rows = with_guard(cli.url, lambda g: ledger_rows(g, "org_1"))
    assert [(r["kind"], r["amount"], r["reason"]) for r in rows] == [("grant", 100, "signup"), ("grant", 20, None)]


def test_usage_table_adds_up_real_charges_and_refunds(cli: Cli) -> None:
    add_image_and_video(cli)
    cli.ok("pricing", "update", VIDEO, "--active")
    cli.ok("grant", "org_1", "100")
    cli.ok("grant", "org_2", "100")

    async def spend(guard: CreditGuard) -> None:
        first = await guard.deduct_credits("org_1", IMAGE)
        await guard.deduct_credits("org_1", IMAGE)
        await guard.deduct_credits("org_2", VIDEO)
        assert first.charge_id is not None
        assert (await guard.refund_credits(first.charge_id)).refunded

    with_guard(cli.url, spend)

    lines = [line.split() for line in cli.ok("usage", "--group-by", "feature").splitlines()]
    assert lines == [
        ["FEATURE", "CHARGES", "CHARGED", "REFUNDS", "REFUNDED", "NET"],
        [VIDEO, "1", "20", "0", "0", "20"],
        [IMAGE, "2", "10", "1", "5", "5"],
        ["TOTAL", "3", "30", "1", "5", "25"],
    ]
    by_day = [line.split() for line in cli.ok("usage").splitlines()]
    assert by_day[0][0] == "DAY"
    assert by_day[1][1:] == by_day[2][1:] == ["3", "30", "1", "5", "25"]
    org_1 = json.loads(cli.ok("usage", "--group-by", "org", "--org", "org_1", "--json"))
    assert org_1 == [
        {"key": "org_1", "charges": 2, "credits_charged": 10, "refunds": 1, "credits_refunded": 5, "net_credits": 5}
    ]
    code, out, err = cli("usage", "--since", "2999-01-01")
    assert (code, out, err) == (0, "", "no usage matches\n")


def test_audit_is_clean_until_a_balance_is_tampered_with(cli: Cli) -> None:
    cli.ok("grant", "org_1", "100")
    code, out, _ = cli("audit")
    assert (code, out) == (0, "audit ok: every balance matches its ledger\n")

    async def tamper(guard: CreditGuard) -> None:
        async with guard.engine.begin() as conn:
            await conn.execute(update(accounts).values(balance=accounts.c.balance + 1))

    with_guard(cli.url, tamper)
    code, out, err = cli("audit")
    assert code == 1
    assert out == (
        "org_1: balance differs from ledger (balance=101 ledger_sum=100)\n"
        "org_1: balance differs from its grants (balance=101 ledger_sum=100)\n"
    )
    assert err == "credit-guard: error: audit found 2 issue(s)\n"
    assert json.loads(cli("audit", "--json")[1]) == [
        {"organization_id": "org_1", "problem": "balance differs from ledger", "balance": 101, "ledger_sum": 100},
        {"organization_id": "org_1", "problem": "balance differs from its grants", "balance": 101, "ledger_sum": 100},
    ]


def test_installed_console_script_runs(tmp_path: Path) -> None:
    script = shutil.which("credit-guard", path=os.path.dirname(sys.executable))
    assert script is not None, "credit-guard is not installed next to this Python (pip install -e .)"
    env = {**os.environ, "CREDIT_GUARD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'script.db'}"}
    done = subprocess.run(
        [script, "init"], env=env, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert "credit_guard_ledger" in done.stdout
    done = subprocess.run(
        [script, "grant", "org_1", "zero"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "not an integer: 'zero'" in done.stderr


def test_guard_import_pricing_names_bad_rows_and_writes_nothing(cli: Cli) -> None:
    rows = [
        {"feature_key": "good_one", "feature_name": "A", "category": "c", "credits": 1},
        {"feature_key": "bad_one", "category": "c", "credits": -1},
    ]

    async def attempt(guard: CreditGuard) -> dict[str, str]:
        with pytest.raises(InvalidPricing) as info:
            await guard.import_pricing(rows)
        return info.value.errors

    assert with_guard(cli.url, attempt) == {
        "row 2: feature_name": "is required",
        "row 2: credits": "must be between 0 and 1000000",
    }
    assert prices(cli.url) == {}


def test_plausible_bad_input_gets_one_line_not_a_traceback(cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli("grant", "org_1", "9" * 30)
    assert code == 2 and "positive integer up to" in err
    code, _, err = cli("usage", "--since", "9999-12-31T23:00:00-05:00")
    assert code == 2 and "range" in err
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000)
    code, _, err = cli("pricing", "import", str(nested))
    assert code == 1 and "nested too deeply" in err and "Traceback" not in err
    huge = tmp_path / "huge.csv"
    huge.write_text("feature_key,feature_name,category,credits,description\n" + f'a_b,A,C,1,"{"x" * 200_000}"\n')
    code, _, err = cli("pricing", "import", str(huge))
    assert code == 1 and "invalid CSV" in err and "Traceback" not in err
    assert prices(cli.url) == {}
    code, _, err = cli("pricing", "add", "--key", "k\n", "--name", "K", "--category", "C", "--credits", "1")
    assert code == 1 and "feature_key" in err


def test_sweep_releases_the_holds_of_a_process_that_died(cli: Cli) -> None:
    """A guard that charged holds and died (its holds forgotten, never settled): once the
    holds expire, `credit-guard sweep` gives the credits back, once."""
    add_image_and_video(cli)
    cli.ok("grant", "org-dead", "100")

    async def charge_and_die() -> list[int]:
        async with CreditGuard(cli.url, hold_timeout=0.05, sweep=False) as dying:
            ids = []
            for _ in range(3):
                result = await dying.deduct_credits("org-dead", IMAGE, hold=True)
                assert result.success and result.charge_id is not None
                ids.append(result.charge_id)
                dying.holds.forget(result.charge_id)  # the process "dies": nothing keeps them alive
            return ids

    charged = with_guard(cli.url, lambda g: charge_and_die())
    assert cli.ok("balance", "org-dead").split()[-1] == "85"
    anyio.run(anyio.sleep, 0.1)
    assert cli.ok("sweep") == "released 3 expired hold(s)\n"
    assert cli.ok("sweep") == "released 0 expired hold(s)\n"
    assert cli.ok("balance", "org-dead").split()[-1] == "100"
    refunds = [row for row in with_guard(cli.url, lambda g: ledger_rows(g, "org-dead")) if row["kind"] == "refund"]
    assert sorted(row["refund_of"] for row in refunds) == charged
    assert {row["reason"] for row in refunds} == {"hold expired"}
    assert cli.ok("audit").startswith("audit ok")


def test_grants_with_expiry_priority_overdraft_and_release(cli: Cli) -> None:
    add_image_and_video(cli)
    assert cli.ok("grant", "org_1", "30", "--expires-at", "2999-01-01T00:00:00+00:00", "--reason", "plan").endswith(
        "balance 30\n"
    )
    assert cli.ok("grant", "org_1", "5", "--priority", "-1", "--reason", "promo") == "granted 5 to org_1: balance 35\n"
    listed = json.loads(cli.ok("grants", "org_1", "--json"))
    assert [(g["reason"], g["remaining"], g["priority"], g["expires_at"]) for g in listed] == [
        ("promo", 5, -1, None),
        ("plan", 30, 0, "2999-01-01T00:00:00+00:00"),
    ]
    table = cli.ok("grants", "org_1")
    assert "promo" in table and "never" in table and "spendable: 35 (org_1)" in table
    assert cli.ok("overdraft", "org_1", "10") == "overdraft limit of org_1: 10\n"

    async def reserve(guard: CreditGuard) -> None:
        assert (await guard.reserve("org_1", IMAGE, job_id="job-7", ttl=600)).success

    with_guard(cli.url, reserve)
    assert cli.ok("balance", "org_1") == "30\n"
    assert cli.ok("release", "job-7") == "released job job-7: 5 credits back\n"
    assert cli.ok("release", "job-7") == "job job-7 was already released: nothing moved\n"
    code, _, err = cli("release", "job-nope")
    assert (code, err) == (1, "credit-guard: error: no reservation for job 'job-nope'\n")
    code, _, err = cli("grant", "org_1", "5", "--expires-at", "yesterday")
    assert code == 2 and "not an ISO date" in err
    code, _, err = cli("grant", "org_1", "5", "--expires-at", "2001-01-01")
    assert code == 1 and "has passed" in err
    assert cli.ok("balance", "org_1") == "35\n"
    assert cli.ok("audit").startswith("audit ok")


@pytest.mark.slow
def test_the_session_in_docs_cli_md_is_true(tmp_path: Path) -> None:
    """docs/cli.md's sample session, run command by command on a new SQLite file: every
    line it shows is what the command prints (ids aside); and every command is in it."""
    import re
    import shlex

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    session = doc.split("```console\n", 1)[1].split("```", 1)[0]
    (tmp_path / "prices.csv").write_text(doc.split("```csv\n", 1)[1].split("```", 1)[0])
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    env = {k: v for k, v in os.environ.items() if k != "CREDIT_GUARD_DATABASE_URL"}
    shown: list[tuple[str, list[str]]] = []
    for line in session.splitlines():
        if line.startswith("$ "):
            shown.append((line[2:], []))
        else:
            shown[-1][1].append(line)
    for command, expected in shown:
        args = shlex.split(command)
        assert args[0] == "credit-guard"
        done = subprocess.run(
            [str(Path(sys.executable).with_name("credit-guard")), *args[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        printed = (done.stdout + done.stderr).rstrip("\n").splitlines()
        assert [uuid.sub("<id>", x) for x in printed] == [uuid.sub("<id>", x) for x in expected], command
    commands = {shlex.split(command)[1] for command, _ in shown}
    assert commands == {
        "init",
        "pricing",
        "grant",
        "grants",
        "overdraft",
        "release",
        "balance",
        "usage",
        "audit",
        "sweep",
        "plans",
        "subscribe",
        "unsubscribe",
    }


def test_plans_subscribe_and_unsubscribe_move_credits_as_the_python_api_does(cli: Cli) -> None:
    assert cli.ok("plans", "set", "pro", "--credits", "100", "--rollover", "all") == (
        "plan pro: 100 credits a month, all unused credits roll over\n"
    )
    assert cli.ok("plans", "set", "daily", "--credits", "7", "--period", "day") == (
        "plan daily: 7 credits a day, unused credits reset\n"
    )
    assert cli.ok("subscribe", "org_1", "pro").startswith("org_1 on plan pro: period 0 from ")
    assert cli.ok("balance", "org_1") == "100\n"
    assert cli.ok("subscribe", "org_1", "daily", "--keep").startswith("org_1 on plan daily: period 0 from ")
    assert cli.ok("balance", "org_1") == "107\n"  # Pro's period kept to its end
    code, _, err = cli("plans", "remove", "daily")
    assert (code, err) == (
        1,
        "credit-guard: error: plan 'daily' has subscribers, so it cannot be deleted: move them to another plan first\n",
    )
    code, _, err = cli("subscribe", "org_1", "gold")
    assert code == 1 and "no plan 'gold'" in err
    code, _, err = cli("plans", "set", "gold", "--credits", "5", "--rollover", "some")
    assert code == 2 and "not an integer or 'all'" in err
    assert cli.ok("unsubscribe", "org_1", "--expire") == "org_1 left plan daily\n"
    assert cli.ok("balance", "org_1") == "100\n"  # the daily period written off now
    assert cli.ok("unsubscribe", "org_1") == "org_1 has no plan: nothing changed\n"
    assert cli.ok("plans", "remove", "daily") == "removed plan daily\n"
    assert cli.ok("plans", "list").splitlines() == [
        "PLAN  CREDITS  PERIOD  ROLLOVER  SUBSCRIBERS  NAME",
        "pro       100  month        all            0  pro",
    ]
    assert cli.ok("audit").startswith("audit ok")
