"""The campaign file: what a good one parses to, and every bad one refused with the file and key named."""

from __future__ import annotations

import datetime as dt

import pytest

from index_builder.campaign import HOLDOUT, CampaignError, load_campaign
from ranking import bucket

GOOD = """
name = "week_49"
[who]
segments = ["region=r1"]
min_consumed = 2
list = "customers.txt"
[offers]
k = 8
catalogue = "promo.csv"
exclude_categories = ["cat0"]
max_price = 60.0
max_category_share = 0.25
[context]
channel = "email"
send_time = 2024-01-20T08:00:00Z
[[rules]]
name = "no_cat1_by_email"
when = { channel = "email" }
exclude_categories = ["cat1"]
[measurement]
salt = "s1"
holdout = 0.2
arms = [
  { name = "popular", variant = "POPULAR", weight = 1 },
  { name = "one_to_one", variant = "one_to_one", weight = 3 },
]
"""


def _write(tmp_path, text: str, name: str = "campaign.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_full_campaign_parses_with_paths_beside_the_file(tmp_path):
    (tmp_path / "customers.txt").write_text("# this week's list\nu1\nu2\n\nu1\n")
    (tmp_path / "promo.csv").write_text("item_id,discount\ni1,0.1\ni7,0.2\n")
    c = load_campaign(_write(tmp_path, GOOD))
    assert c.name == "week_49" and c.customers == ("u1", "u2") and c.catalogue == ("i1", "i7")
    assert c.offers.k == 8 and c.offers.per_category() == 2 and c.offers.exclude_categories == ("cat0",)
    assert c.context.send_time == dt.datetime(2024, 1, 20, 8, tzinfo=dt.UTC).timestamp()
    assert [r.name for r in c.rules] == ["no_cat1_by_email"]
    assert c.arm_names() == ["popular", "one_to_one"]
    assert c.who.segments == ("region=r1",) and c.who.min_consumed == 2
    # The holdout is its own salted hash; the arms follow the weights among the rest.
    groups = [c.group(f"u{i}") for i in range(4000)]
    held = [g for g in groups if g[0] == HOLDOUT]
    assert len(held) == sum(bucket(f"u{i}", "s1:holdout") < 0.2 for i in range(4000))
    rest = [g for g in groups if g[0] != HOLDOUT]
    share = sum(g[0] == "one_to_one" for g in rest) / len(rest)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / len(rest)) ** 0.5
    assert {g[1] for g in rest} == {"POPULAR", "ONE_TO_ONE"}


def test_defaults_one_arm_no_holdout_send_now(tmp_path):
    c = load_campaign(_write(tmp_path, 'name = "n1"\n[offers]\nk = 5\n'), now=1234.0)
    assert c.holdout == 0 and c.arm_names() == ["one_to_one"] and c.context.send_time == 1234.0
    assert c.customers is None and c.catalogue == () and c.offers.per_category() == 5
    assert c.group("anyone") == ("one_to_one", "ONE_TO_ONE")


@pytest.mark.parametrize(
    ("body", "key", "says"),
    [
        ('name = "x"\n', "offers.k", "required"),
        ('name = "x"\n[offers]\nk = 0\n', "offers.k", "within [1, 100]"),
        ('name = "x"\n[offers]\nk = "ten"\n', "offers.k", "integer"),
        ('name = "Bad Name"\n[offers]\nk = 5\n', "name", "a-z"),
        ('name = "x"\nhow = 1\n[offers]\nk = 5\n', "campaign.toml", "unknown key(s) how"),
        ('name = "x"\n[offers]\nk = 5\nmax_share = 0.2\n', "offers", "unknown key(s) max_share"),
        ('name = "x"\n[offers]\nk = 5\nmax_category_share = 1.5\n', "offers.max_category_share", "within [0.0, 1.0]"),
        ('name = "x"\n[offers]\nk = 5\nmin_price = 9\nmax_price = 3\n', "offers.max_price", "below"),
        ('name = "x"\n[offers]\nk = 5\ncatalogue = "nope.txt"\n', "offers.catalogue", "does not exist"),
        ('name = "x"\n[offers]\nk = 5\n[who]\nlist = "nope.txt"\n', "who.list", "does not exist"),
        ('name = "x"\n[offers]\nk = 5\n[who]\nmin_consumed = -1\n', "who.min_consumed", "integer"),
        ('name = "x"\n[offers]\nk = 5\n[who]\nsegments = "r1"\n', "who.segments", "list"),
        ('name = "x"\n[offers]\nk = 5\n[context]\nsend_time = 2024-01-20T08:00:00\n', "context.send_time", "zone"),
        ('name = "x"\n[offers]\nk = 5\n[context]\nsend_time = 2024-01-20\n', "context.send_time", "is a date"),
        ('name = "x"\n[offers]\nk = 5\n[context]\nchannel = 3\n', "context.channel", "string"),
        ('name = "x"\n[offers]\nk = 5\n[measurement]\nholdout = 1.0\n', "measurement.holdout", "nobody"),
        ('name = "x"\n[offers]\nk = 5\n[measurement]\nholdout = -0.1\n', "measurement.holdout", "within"),
        (
            'name = "x"\n[offers]\nk = 5\n[measurement]\narms = [{ name = "a", variant = "BEST" }]\n',
            "measurement",
            "variant 'BEST' is not one of",
        ),
        (
            'name = "x"\n[offers]\nk = 5\n[measurement]\narms = [{ name = "holdout", variant = "POPULAR" }]\n',
            "measurement.arms",
            "holdout",
        ),
        ('name = "x"\n[offers]\nk = 5\n[[rules]]\nname = "r"\nwhen = { channel = "email" }\n', "rule 'r'", "nothing"),
        ('name = "x"\n[offers\nk = 5\n', "campaign.toml", "not valid TOML"),
    ],
)
def test_bad_campaign_files_are_refused_naming_the_key(tmp_path, body, key, says):
    with pytest.raises(CampaignError) as err:
        load_campaign(_write(tmp_path, body))
    msg = str(err.value)
    assert str(tmp_path / "campaign.toml") in msg and key in msg and says in msg, msg


def test_an_empty_list_file_and_a_list_without_the_column_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("# nobody\n\n")
    (tmp_path / "wrong.csv").write_text("customer,x\nu1,1\n")
    for name, says in (("empty.txt", "lists no id"), ("wrong.csv", "no 'user_id' column")):
        with pytest.raises(CampaignError, match=f"who.list: .*{says}"):
            load_campaign(_write(tmp_path, f'name = "x"\n[offers]\nk = 5\n[who]\nlist = "{name}"\n'))
