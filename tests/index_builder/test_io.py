"""Tests for index_builder.io: reading and validating events, items and users."""

import gzip
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_builder.io import InputError, ReadOptions, SkipReport, read_events, read_items, read_users

CONTEXT = pa.dictionary(pa.int32(), pa.string())
EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("timestamp", pa.int64()),
        ("value", pa.float64()),
        ("channel", CONTEXT),
        ("device", CONTEXT),
        ("region", CONTEXT),
        ("order_id", CONTEXT),
    ]
)


def no_context(n):
    """The context columns (and order id) of a file that has none: null for every event."""
    return {"channel": [None] * n, "device": [None] * n, "region": [None] * n, "order_id": [None] * n}


SKIP = ReadOptions(on_bad_row="skip", max_bad_fraction=0.5)
HEADER = "user_id,item_id,event_type,timestamp,value\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(tmp_path, name, columns):
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def error_of(call, *args):
    with pytest.raises(InputError) as caught:
        call(*args)
    return caught.value


# --- events: happy paths ------------------------------------------------------------


def test_events_csv_mixes_unix_and_iso_timestamps_and_keeps_ids_as_strings(tmp_path):
    path = write(
        tmp_path,
        "events.csv",
        HEADER
        + (
            "007,0042, Click ,1700000000,\n"
            "u2,i2,VIEW,2024-01-02T03:04:05Z,1.5\n"
            "u3,i3,view,2024-01-02 03:04:05,2\n"
            'u4,i4,view,"2024-01-02T05:04:05+02:00", -3e1 \n'
            "u5,i5,buy,1700000000.9,0\n"
            "u6,i6,buy,2024-02-29,\n"
            "u7,i7,buy,2024-01-01T23:04:05.250-04:00,\n"
            "u8,i8,buy,1969-12-31T23:59:59Z,\n"
            "u9,i9,buy,+946664999,\n"
            "u10,i10,buy,1999-12-31T23:59:59+0530,\n"
        ),
    )

    table, report = read_events(path)

    assert table.schema == EVENTS_SCHEMA
    assert table.to_pydict() == {
        "user_id": ["007", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9", "u10"],
        "item_id": ["0042", "i2", "i3", "i4", "i5", "i6", "i7", "i8", "i9", "i10"],
        "event_type": ["click", "view", "view", "view", "buy", "buy", "buy", "buy", "buy", "buy"],
        "timestamp": [
            1700000000,
            1704164645,
            1704164645,
            1704164645,
            1700000000,
            1709164800,
            1704164645,
            -1,
            946664999,
            946664999,
        ],
        "value": [None, 1.5, 2.0, -30.0, 0.0, None, None, None, None, None],
        **no_context(10),
    }
    assert report.total == 0
    assert report.to_dict() == {"path": str(path), "total": 0, "counts": {}, "examples": []}


def test_events_all_integer_timestamps_and_no_value_column(tmp_path):
    path = write(tmp_path, "events.csv", "timestamp,event_type,item_id,user_id,extra\n10,view,1,1,x\n20,view,2,01,y\n")

    table, report = read_events(path)

    assert table.schema == EVENTS_SCHEMA
    assert table.to_pydict() == {
        "user_id": ["1", "01"],
        "item_id": ["1", "2"],
        "event_type": ["view", "view"],
        "timestamp": [10, 20],
        "value": [None, None],
        **no_context(2),
    }
    assert report.total == 0


def test_events_parquet_casts_ids_and_native_timestamps(tmp_path):
    path = write_parquet(
        tmp_path,
        "events.parquet",
        {
            "user_id": pa.array([7, 8], pa.int64()),
            "item_id": pa.array(["007", "x"]),
            "event_type": pa.array(["View", "view"]),
            "timestamp": pa.array([1_704_164_645_999, 0], pa.timestamp("ms", tz="UTC")),
            "value": pa.array([3, None], pa.int32()),
        },
    )

    table, report = read_events(path)

    assert table.schema == EVENTS_SCHEMA
    assert table.to_pydict() == {
        "user_id": ["7", "8"],
        "item_id": ["007", "x"],
        "event_type": ["view", "view"],
        "timestamp": [1704164645, 0],
        "value": [3.0, None],
        **no_context(2),
    }
    assert report.total == 0


def test_events_parquet_string_timestamps_mixed(tmp_path):
    path = write_parquet(
        tmp_path,
        "events.pq",
        {
            "user_id": ["a", "b", "c"],
            "item_id": ["1", "2", "3"],
            "event_type": ["v", "v", "v"],
            "timestamp": ["1700000000", "2024-01-02T03:04:05Z", "12.5"],
        },
    )

    table, _ = read_events(path)

    assert table.column("timestamp").to_pylist() == [1700000000, 1704164645, 12]


def test_events_csv_gz_and_custom_delimiter(tmp_path):
    path = tmp_path / "events.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("user_id;item_id;event_type;timestamp\nu;1,5;view;100\n")

    table, _ = read_events(path, ReadOptions(csv_delimiter=";"))

    assert table.to_pydict() == {
        "user_id": ["u"],
        "item_id": ["1,5"],
        "event_type": ["view"],
        "timestamp": [100],
        "value": [None],
        **no_context(1),
    }


# --- events: bad rows, located exactly -----------------------------------------------


def test_bad_timestamp_on_third_data_line_is_row_4(tmp_path):
    path = write(tmp_path, "events.csv", HEADER + "u,i,view,1,\nu,i,view,2,\nu,i,view,abc,\n")

    error = error_of(read_events, path)

    assert (error.path, error.row, error.column) == (str(path), 4, "timestamp")
    assert error.reason == "cannot parse 'abc' as unix seconds or ISO-8601"
    assert str(error) == (f"{path}: row 4, column 'timestamp': cannot parse 'abc' as unix seconds or ISO-8601")


@pytest.mark.parametrize(
    "line, column, reason",
    [
        (",i,view,1,", "user_id", "user_id is empty"),
        ("u,  ,view,1,", "item_id", "item_id is empty"),
        ("u,i, ,1,", "event_type", "event_type is empty"),
        ("u,i,view,,", "timestamp", "timestamp is empty"),
        ("u,i,view,2024-02-30,", "timestamp", "cannot parse '2024-02-30' as unix seconds or ISO-8601"),
        (
            "u,i,view,2024-01-02T25:00:00,",
            "timestamp",
            "cannot parse '2024-01-02T25:00:00' as unix seconds or ISO-8601",
        ),
        (
            "u,i,view,1700000000000,",
            "timestamp",
            "'1700000000000' is outside years 1-9999 as unix seconds (milliseconds?)",
        ),
        ("u,i,view,1,x", "value", "value must be a finite number, got 'x'"),
        ("u,i,view,1,nan", "value", "value must be a finite number, got 'nan'"),
    ],
)
def test_each_bad_event_cell_names_row_and_column(tmp_path, line, column, reason):
    path = write(tmp_path, "events.csv", HEADER + "u,i,view,1,1\n" + line + "\n")

    error = error_of(read_events, path)

    assert (error.row, error.column, error.reason) == (3, column, reason)


def test_first_bad_row_in_file_order_is_reported(tmp_path):
    path = write(tmp_path, "events.csv", HEADER + "u,i,view,1,\nu,i,view,1,1,1\n,i,view,1,\n")

    error = error_of(read_events, path)

    assert (error.row, error.column) == (3, None)
    assert error.reason == "expected 5 fields, found 6: 'u,i,view,1,1,1'"


def test_ragged_line_is_an_input_error_naming_the_line(tmp_path):
    path = write(tmp_path, "events.csv", HEADER + "u,i,view,1,\n,i,view,x,\nu,i,view\n")

    error = error_of(read_events, path)

    # The empty user_id on line 3 comes first; line 4 is the ragged one.
    assert (error.row, error.column, error.reason) == (3, "user_id", "user_id is empty")
    path = write(tmp_path, "events2.csv", HEADER + "u,i,view,1,\nu,i,view\n")
    error = error_of(read_events, path)
    assert str(error) == f"{path}: row 3: expected 5 fields, found 3: 'u,i,view'"


def test_rows_count_physical_lines_past_quoted_newlines_and_blank_lines(tmp_path):
    path = write(
        tmp_path, "items.csv", 'item_id,title,price\n1,"two\nlines",1\n\n2,"three\nmore\nlines",2\n3,x,1,9\n4,y,-1\n'
    )

    error = error_of(read_items, path)

    # Lines: 1 header, 2-3 item 1, 4 blank, 5-7 item 2, 8 ragged, 9 item 4.
    assert (error.row, error.column) == (8, None)
    table, report = read_items(path, SKIP)
    assert table.column("item_id").to_pylist() == ["1", "2"]
    assert table.column("title").to_pylist() == ["two\nlines", "three\nmore\nlines"]
    assert report.counts == {"wrong number of fields": 1, "bad price": 1, "blank row": 1}
    assert report.examples == [
        f"{path}: row 8: expected 3 fields, found 4: '3,x,1,9'",
        f"{path}: row 9, column 'price': price must not be negative, got '-1'",
    ]


def test_invalid_utf8_is_located(tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes(HEADER.encode() + b'u,i,view,1,\n"a\nb",\xff,view,1,\n')

    error = error_of(read_events, path)

    assert (error.row, error.column) == (3, "item_id")
    assert error.reason == "not valid UTF-8: b'\\xff'; save the file as UTF-8"


def test_rows_stay_exact_across_csv_blocks(tmp_path):
    # ~3 MB, so pyarrow reads several blocks (and re-reads for the ragged line).
    lines = [f"user{i},item{i},view,{1_600_000_000 + i},1\n" for i in range(100_000)]
    lines[71_234] = "u,i,view,2024-13-01,1\n"
    lines[90_000] = "u,i\n"
    path = write(tmp_path, "events.csv", HEADER + "".join(lines))
    bad_utf8 = tmp_path / "utf8.csv"
    bad_utf8.write_bytes(path.read_bytes().replace(b"user80000,", b"\xc3(,"))

    table, report = read_events(path, ReadOptions(on_bad_row="skip"))

    assert table.num_rows == 99_998
    assert report.examples == [
        f"{path}: row 71236, column 'timestamp': cannot parse '2024-13-01' as unix seconds or ISO-8601",
        f"{path}: row 90002: expected 5 fields, found 2: 'u,i'",
    ]
    assert (error_of(read_events, path).row, error_of(read_events, bad_utf8).row) == (71236, 80002)


def test_parquet_bad_row_is_the_record_number(tmp_path):
    path = write_parquet(
        tmp_path,
        "events.parquet",
        {
            "user_id": ["a", None, "c"],
            "item_id": ["1", "2", "3"],
            "event_type": ["v"] * 3,
            "timestamp": pa.array([1, 2, 3], pa.int64()),
        },
    )

    error = error_of(read_events, path)

    assert (error.row, error.column, error.reason) == (2, "user_id", "user_id is empty")


# --- skip mode -----------------------------------------------------------------------


def test_skip_mode_drops_and_counts_bad_rows(tmp_path):
    good = "".join(f"u{i},i{i},view,{i},\n" for i in range(8))
    path = write(tmp_path, "events.csv", HEADER + good + "u,i,view,abc,\n,i,view,1,\nu,i\nu,i,view,2,x\n\n")

    table, report = read_events(path, SKIP)

    assert table.column("user_id").to_pylist() == [f"u{i}" for i in range(8)]
    assert table.column("timestamp").to_pylist() == list(range(8))
    assert report.counts == {
        "wrong number of fields": 1,
        "bad timestamp": 1,
        "empty user_id": 1,
        "bad value": 1,
        "blank row": 1,
    }
    assert report.total == 5
    assert report.examples == [
        f"{path}: row 10, column 'timestamp': cannot parse 'abc' as unix seconds or ISO-8601",
        f"{path}: row 11, column 'user_id': user_id is empty",
        f"{path}: row 12: expected 5 fields, found 2: 'u,i'",
        f"{path}: row 13, column 'value': value must be a finite number, got 'x'",
    ]
    assert report.to_dict()["total"] == 5


def test_skip_mode_keeps_at_most_five_examples(tmp_path):
    bad = "".join(f"u,i,view,bad{i},\n" for i in range(7))
    path = write(tmp_path, "events.csv", HEADER + bad + "u,i,view,1,\n")

    table, report = read_events(path, ReadOptions(on_bad_row="skip", max_bad_fraction=1.0))

    assert table.num_rows == 1
    assert report.counts == {"bad timestamp": 7}
    assert [e.split(": ", 1)[1] for e in report.examples] == [
        f"row {i + 2}, column 'timestamp': cannot parse 'bad{i}' as unix seconds or ISO-8601" for i in range(5)
    ]


def test_skip_mode_with_too_many_bad_rows_is_an_error(tmp_path):
    path = write(tmp_path, "events.csv", HEADER + "u,i,view,1,\nu,i,view,x,\nu,i,view,2,\n")

    error = error_of(read_events, path, ReadOptions(on_bad_row="skip"))

    assert (error.row, error.column) == (None, None)
    assert error.reason == (
        "1 of 3 rows are bad (33.33%), more than max_bad_fraction=0.01 allows; "
        "first: row 3, column 'timestamp': cannot parse 'x' as unix seconds "
        "or ISO-8601"
    )


def test_blank_lines_are_dropped_and_reported_in_error_mode_too(tmp_path):
    path = write(tmp_path, "events.csv", HEADER + "u,i,view,1,\n\n\n")

    table, report = read_events(path)

    assert table.num_rows == 1
    assert report.counts == {"blank row": 2}
    assert report.examples == []


# --- whole-file errors ---------------------------------------------------------------


def test_missing_required_column_names_it_and_lists_found_columns(tmp_path):
    path = write(tmp_path, "events.csv", "user_id,item_id,event,timestamp\nu,i,v,1\n")

    error = error_of(read_events, path)

    assert (error.row, error.column) == (None, "event_type")
    assert error.reason == (
        "missing required column 'event_type'; found columns: 'user_id', 'item_id', 'event', 'timestamp'"
    )


def test_header_only_and_empty_files_have_no_events(tmp_path):
    header_only = write(tmp_path, "events.csv", HEADER)
    empty = write(tmp_path, "empty.csv", "")

    assert error_of(read_events, header_only).reason == ("file has no events: no data rows after the header")
    assert error_of(read_events, empty).reason == "file has no events: it is empty"


def test_unknown_extension_names_the_path(tmp_path):
    path = write(tmp_path, "events.json", "{}")

    error = error_of(read_events, path)

    assert str(error) == (f"{path}: unsupported file extension; expected .csv, .csv.gz, .parquet or .pq")


def test_duplicate_header_column_is_an_error(tmp_path):
    path = write(tmp_path, "users.csv", "user_id,age,age\n1,2,3\n")

    error = error_of(read_users, path)

    assert (error.row, error.reason) == (1, "the header names column 'age' twice")


def test_read_options_are_validated():
    with pytest.raises(ValueError, match="on_bad_row must be 'error' or 'skip', got 'drop'"):
        ReadOptions(on_bad_row="drop")
    with pytest.raises(ValueError, match="max_bad_fraction must be within"):
        ReadOptions(max_bad_fraction=1.5)
    with pytest.raises(ValueError, match="csv_delimiter must be one character"):
        ReadOptions(csv_delimiter="||")


def test_input_error_survives_pickling():
    error = InputError("events.csv", "bad", row=17, column="timestamp")

    copy = pickle.loads(pickle.dumps(error))

    assert (copy.path, copy.row, copy.column, copy.reason) == ("events.csv", 17, "timestamp", "bad")
    assert str(copy) == "events.csv: row 17, column 'timestamp': bad"


def test_empty_skip_report():
    report = SkipReport("x.csv")

    assert (report.total, report.to_dict()) == (0, {"path": "x.csv", "total": 0, "counts": {}, "examples": []})


# --- items and users -----------------------------------------------------------------


def test_items_split_categories_parse_price_and_keep_attributes(tmp_path):
    path = write(
        tmp_path,
        "items.csv",
        "item_id,title,category,price,brand,year\n"
        "0042,Toy Story,Animation| Comedy||,9.5,acme,1995\n"
        "7,,,,,\n"
        '8,"Heat, The",Action,0,,01\n',
    )

    table, report = read_items(path)

    assert table.schema == pa.schema(
        [
            ("item_id", pa.string()),
            ("title", pa.string()),
            ("categories", pa.list_(pa.string())),
            ("price", pa.float64()),
            ("brand", pa.string()),
            ("year", pa.string()),
        ]
    )
    assert table.to_pydict() == {
        "item_id": ["0042", "7", "8"],
        "title": ["Toy Story", None, "Heat, The"],
        "categories": [["Animation", "Comedy"], [], ["Action"]],
        "price": [9.5, None, 0.0],
        "brand": ["acme", None, None],
        "year": ["1995", None, "01"],
    }
    assert report.total == 0


def test_items_with_only_ids(tmp_path):
    path = write(tmp_path, "items.csv", "item_id\n1\n2\n")

    table, _ = read_items(path)

    assert table.to_pydict() == {
        "item_id": ["1", "2"],
        "title": [None, None],
        "categories": [[], []],
        "price": [None, None],
    }


def test_items_parquet_accepts_list_categories(tmp_path):
    path = write_parquet(
        tmp_path,
        "items.parquet",
        {
            "item_id": ["a", "b"],
            "category": pa.array([["x", " "], None], pa.list_(pa.string())),
            "price": pa.array([1.25, None]),
        },
    )

    table, _ = read_items(path)

    assert table.column("categories").to_pylist() == [["x"], []]
    assert table.column("price").to_pylist() == [1.25, None]


@pytest.mark.parametrize(
    "price, reason",
    [
        ("-1", "price must not be negative, got '-1'"),
        ("cheap", "price must be a finite number, got 'cheap'"),
        ("inf", "price must be a finite number, got 'inf'"),
    ],
)
def test_bad_price_is_a_bad_row(tmp_path, price, reason):
    path = write(tmp_path, "items.csv", f"item_id,price\n1,2\n2,{price}\n")

    error = error_of(read_items, path)

    assert (error.row, error.column, error.reason) == (3, "price", reason)


def test_duplicate_item_id_names_both_rows(tmp_path):
    path = write(tmp_path, "items.csv", "item_id,price\n1,1\n2,1\n3,x\n 2,1\n1,1\n")

    error = error_of(read_items, path, ReadOptions(on_bad_row="skip", max_bad_fraction=0.5))

    # Row 4 was skipped; the earliest repeat is ' 2' on row 5 (ids are stripped).
    assert str(error) == f"{path}: row 5, column 'item_id': duplicate item_id '2' (first at row 3)"


def test_users_keep_attributes_as_strings(tmp_path):
    path = write(tmp_path, "users.csv", "user_id,age,zip_code\n001,24,05201\n2,,\n")

    table, report = read_users(path)

    assert table.schema == pa.schema([("user_id", pa.string()), ("age", pa.string()), ("zip_code", pa.string())])
    assert table.to_pydict() == {"user_id": ["001", "2"], "age": ["24", None], "zip_code": ["05201", None]}
    assert report.total == 0


def test_users_parquet_attributes_cast_to_strings(tmp_path):
    path = write_parquet(tmp_path, "users.parquet", {"user_id": ["a"], "age": pa.array([24])})

    table, _ = read_users(path)

    assert table.to_pydict() == {"user_id": ["a"], "age": ["24"]}


def test_duplicate_user_id_names_both_rows(tmp_path):
    path = write(tmp_path, "users.csv", "user_id\nu1\nu2\nu1\n")

    error = error_of(read_users, path)

    assert (error.row, error.column, error.reason) == (4, "user_id", "duplicate user_id 'u1' (first at row 2)")
