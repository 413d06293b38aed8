"""Tests for index_builder.movielens: MovieLens-100K from the recbole wheel to CSV."""

import zipfile

import pytest

from index_builder.io import read_events, read_items, read_users
from index_builder.movielens import fetch_movielens

MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
# Columns deliberately out of the real files' order: fields are found by name.
FAKE = {
    "inter": "item_id:token\tuser_id:token\ttimestamp:float\trating:float\n"
    "242\t196\t881250949\t3\n"
    "12\t1\t881250950.0\t5\n",
    "item": "item_id:token\tclass:token_seq\tmovie_title:token_seq\trelease_year:token\n"
    "1\tAnimation Children's Comedy\tToy Story\t1995\n"
    "12\tCrime Thriller\tUsual Suspects, The\t1995\n"
    "242\tDrama\t\t1996\n"
    '243\tComedy\tSay "Hi"\t1997\n',
    "user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t24\tM\ttechnician\t85711\n"
    "196\t49\tF\twriter\t05201\n",
}


def fake_wheel(cache_dir, members=FAKE):
    cache_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache_dir / "recbole-1.2.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("recbole/__init__.py", "")
        for suffix, text in members.items():
            wheel.writestr(MEMBER.format(suffix), text)


def failing_python(tmp_path):
    """A stand-in interpreter that fails like pip without network access."""
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\n"
        "echo 'WARNING: Retrying after connection broken' >&2\n"
        "echo 'ERROR: No matching distribution found for recbole==1.2.1' >&2\n"
        "exit 1\n"
    )
    script.chmod(0o755)
    return str(script)


def test_fake_wheel_is_read_from_the_cache_without_pip(tmp_path):
    cache = tmp_path / "cache"
    fake_wheel(cache)

    # A failing interpreter proves pip is never run when the wheel is cached.
    paths = fetch_movielens(tmp_path / "out", cache_dir=cache, python=failing_python(tmp_path))

    out = tmp_path / "out"
    assert paths == {"events": out / "events.csv", "items": out / "items.csv", "users": out / "users.csv"}
    assert paths["events"].read_text(encoding="utf-8") == (
        "user_id,item_id,event_type,timestamp,value\n196,242,rating,881250949,3\n1,12,rating,881250950,5\n"
    )
    assert paths["items"].read_text(encoding="utf-8") == (
        "item_id,title,year,category\n"
        "1,Toy Story,1995,Animation|Children's|Comedy\n"
        '12,"Usual Suspects, The",1995,Crime|Thriller\n'
        "242,,1996,Drama\n"
        '243,"Say ""Hi""",1997,Comedy\n'
    )
    assert paths["users"].read_text(encoding="utf-8") == (
        "user_id,age,gender,occupation,zip_code\n1,24,M,technician,85711\n196,49,F,writer,05201\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["events.csv", "items.csv", "users.csv"]


def test_fetched_files_are_accepted_by_the_readers(tmp_path):
    fake_wheel(tmp_path / "cache")
    paths = fetch_movielens(tmp_path / "out", cache_dir=tmp_path / "cache")

    events, events_skipped = read_events(paths["events"])
    items, items_skipped = read_items(paths["items"])
    users, users_skipped = read_users(paths["users"])

    assert events.to_pydict() == {
        "user_id": ["196", "1"],
        "item_id": ["242", "12"],
        "event_type": ["rating", "rating"],
        "timestamp": [881250949, 881250950],
        "value": [3.0, 5.0],
        "channel": [None, None],
        "device": [None, None],
        "region": [None, None],
        "order_id": [None, None],
    }
    assert items.to_pydict() == {
        "item_id": ["1", "12", "242", "243"],
        "title": ["Toy Story", "Usual Suspects, The", None, 'Say "Hi"'],
        "categories": [["Animation", "Children's", "Comedy"], ["Crime", "Thriller"], ["Drama"], ["Comedy"]],
        "price": [None, None, None, None],
        "year": ["1995", "1995", "1996", "1997"],
    }
    assert users.to_pydict() == {
        "user_id": ["1", "196"],
        "age": ["24", "49"],
        "gender": ["M", "F"],
        "occupation": ["technician", "writer"],
        "zip_code": ["85711", "05201"],
    }
    assert events_skipped.total + items_skipped.total + users_skipped.total == 0


def test_pip_failure_reports_stderr_and_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError) as caught:
        fetch_movielens(tmp_path / "out", cache_dir=tmp_path / "cache", python=failing_python(tmp_path))

    message = str(caught.value)
    assert message.startswith("pip could not download recbole==1.2.1 (exit 1); check network access to PyPI")
    assert message.endswith(
        "WARNING: Retrying after connection broken\nERROR: No matching distribution found for recbole==1.2.1"
    )
    assert not (tmp_path / "out").exists()


def test_broken_wheel_leaves_existing_output_untouched(tmp_path):
    fake_wheel(tmp_path / "cache", {k: v for k, v in FAKE.items() if k != "user"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "events.csv").write_text("old\n")

    with pytest.raises(RuntimeError, match="has no recbole/dataset_example/ml-100k/ml-100k.user"):
        fetch_movielens(out, cache_dir=tmp_path / "cache")

    assert [p.name for p in out.iterdir()] == ["events.csv"]
    assert (out / "events.csv").read_text() == "old\n"


def test_missing_field_in_recbole_header_is_named(tmp_path):
    no_timestamp = "user_id:token\titem_id:token\trating:float\n1\t2\t3\n"
    fake_wheel(tmp_path / "cache", {**FAKE, "inter": no_timestamp})

    with pytest.raises(RuntimeError, match=r"ml-100k.inter lacks fields \['timestamp'\]"):
        fetch_movielens(tmp_path / "out", cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_real_movielens_100k_from_pypi(tmp_path):
    cache = tmp_path / "cache"

    paths = fetch_movielens(tmp_path / "out", cache_dir=cache)

    events, _ = read_events(paths["events"])
    items, _ = read_items(paths["items"])
    users, _ = read_users(paths["users"])
    assert (events.num_rows, items.num_rows, users.num_rows) == (100_000, 1_682, 943)
    assert events.slice(0, 1).to_pylist() == [
        {
            "user_id": "196",
            "item_id": "242",
            "event_type": "rating",
            "timestamp": 881250949,
            "value": 3.0,
            "channel": None,
            "device": None,
            "region": None,
            "order_id": None,
        }
    ]
    assert sorted(set(events.column("value").to_pylist())) == [1.0, 2.0, 3.0, 4.0, 5.0]
    # The wheel is now cached: a second fetch must not need pip (or the network).
    again = fetch_movielens(tmp_path / "again", cache_dir=cache, python="/nonexistent/python")
    assert again["events"].read_bytes() == paths["events"].read_bytes()
