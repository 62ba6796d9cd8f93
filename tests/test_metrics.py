"""Task metrics on hand-written cases, near misses included."""
import pytest

from jaxft.tasks import gsm8k, instruct, sql, viggo

# --- ViGGO ---

GOLD_MR = "inform(name[Dirt: Showdown], release_year[2012], genres[driving/racing, sport], has_mac_release[no])"


def mr(output):
    return {"instruction": "", "input": "a sentence", "output": output, "line": 1}


@pytest.mark.parametrize("pred, exact, strict", [
    (GOLD_MR, True, True),
    # spacing, case and list-item order inside a value do not matter
    ("inform( name[dirt:  showdown],release_year[2012], genres[Sport, driving/racing], has_mac_release[No] )",
     True, True),
    # attribute order: exact passes, strict fails
    ("inform(release_year[2012], name[Dirt: Showdown], genres[driving/racing, sport], has_mac_release[no])",
     True, False),
    ("inform(name[Dirt: Showdown], release_year[2013], genres[driving/racing, sport], has_mac_release[no])",
     False, False),  # wrong value
    ("inform(name[Dirt: Showdown], release_year[2012], genres[driving/racing], has_mac_release[no])",
     False, False),  # missing list item
    ("inform(name[Dirt: Showdown], release_year[2012], genres[driving/racing, sport])",
     False, False),  # missing attribute
    ("inform(name[Dirt: Showdown], release_year[2012], genres[driving/racing, sport], has_mac_release[no], "
     "rating[good])", False, False),  # extra attribute
    ("confirm(name[Dirt: Showdown], release_year[2012], genres[driving/racing, sport], has_mac_release[no])",
     False, False),  # wrong function
    ("inform(name[Dirt: Showdown], release_year[2012], genres[driving/racing, sport], has_mac_release[no]",
     False, False),  # unclosed call
    ("inform(name[Dirt: Showdown] release_year[2012])", False, False),  # missing comma
    ("", False, False),
])
def test_viggo_score(pred, exact, strict):
    assert viggo.score(pred, mr(GOLD_MR)) == {"exact": exact, "strict": strict}


def test_viggo_clean_and_empty_value():
    gold = mr("request_attribute(player_perspective[])")
    assert viggo.score("request_attribute(player_perspective[])<END_A>more text", gold)["strict"]
    assert viggo.score(" request_attribute(player_perspective[ ])\nNext sentence: ...", gold)["exact"]
    assert not viggo.score("request_attribute(player_perspective[first person])", gold)["exact"]
    assert viggo.clean("give_opinion(name[X], rating[good])\n\n### Input:\nfoo") == "give_opinion(name[X], rating[good])"
    assert list(viggo.score("x", gold)) == ["exact", "strict"]  # primary metric first


# --- SQL ---

WIKI = {"instruction": "", "line": 1,
        "input": "table: 1-10015132-14\ncolumns: Player, No., Nationality, Position, School/Club Team, Years in Toronto\n"
                 "Q: What school did Patrick O'Bryant play for in 2007?",
        "output": "SELECT School/Club Team FROM 1-10015132-14 WHERE Player = 'Patrick O'Bryant' AND "
                  "Years in Toronto = '2007-2009'"}


@pytest.mark.parametrize("pred, exact, execution", [
    (WIKI["output"], True, True),
    # whitespace, keyword case, trailing semicolon, quote style
    ("select  School/Club Team from 1-10015132-14\nwhere Player = \"Patrick O'Bryant\" and "
     "Years in Toronto='2007-2009' ;", True, True),
    # same meaning, different text: conditions swapped, standard quoting and escaping
    ("SELECT \"School/Club Team\" FROM \"1-10015132-14\" WHERE \"Years in Toronto\" = '2007-2009' "
     "AND \"Player\" = 'Patrick O''Bryant'", False, True),
    # wrong WHERE value
    ("SELECT School/Club Team FROM 1-10015132-14 WHERE Player = 'Patrick O'Bryant' AND "
     "Years in Toronto = '2007-2008'", False, False),
    # a condition dropped
    ("SELECT School/Club Team FROM 1-10015132-14 WHERE Player = 'Patrick O'Bryant'", False, False),
    # wrong selected column
    ("SELECT Position FROM 1-10015132-14 WHERE Player = 'Patrick O'Bryant' AND "
     "Years in Toronto = '2007-2009'", False, False),
    # aggregate added
    ("SELECT COUNT School/Club Team FROM 1-10015132-14 WHERE Player = 'Patrick O'Bryant' AND "
     "Years in Toronto = '2007-2009'", False, False),
    # syntax errors and junk: wrong, never a crash
    ("SELECT School/Club Team FROM WHERE Player = 'Patrick O'Bryant'", False, False),
    ("SELEC School/Club Team FROM 1-10015132-14", False, False),
    ("SELECT * FROM 1-10015132-14 WHERE Player = 'unterminated", False, False),
    ("", False, False),
])
def test_sql_score(pred, exact, execution):
    assert sql.score(pred, WIKI) == {"exact": exact, "execution": execution}


def test_sql_numbers_and_aggregates():
    rec = {"instruction": "", "line": 1, "input": "table: t1\ncolumns: No., Player, Points\nQ: ?",
           "output": "SELECT MIN No. FROM t1 WHERE Points > 12"}
    assert sql.score("SELECT MIN(No.) FROM t1 WHERE Points > 12", rec)["execution"]
    assert sql.score("SELECT MIN No. FROM t1 WHERE Points > '12'", rec)["execution"]  # '12' vs 12
    assert not sql.score("SELECT MAX No. FROM t1 WHERE Points > 12", rec)["execution"]
    assert not sql.score("SELECT MIN No. FROM t1 WHERE Points < 12", rec)["execution"]
    assert not sql.score("SELECT MIN No. FROM t1", rec)["execution"]  # condition ignored
    count = dict(rec, output="SELECT COUNT Player FROM t1 WHERE Points = 7")
    assert sql.score("select count(*) from t1 where points = 7", count)["execution"]
    assert not sql.score("select count(*) from t1", count)["execution"]


def test_sql_create_context_execution():
    rec = {"instruction": "", "line": 1,
           "input": "CREATE TABLE head (age INTEGER, name VARCHAR)\nQ: How many heads are older than 56?",
           "output": "SELECT COUNT(*) FROM head WHERE age > 56"}
    assert sql.score("SELECT COUNT(name) FROM head WHERE 56 < age", rec) == {"exact": False, "execution": True}
    assert not sql.score("SELECT COUNT(*) FROM head WHERE age >= 56", rec)["execution"]
    assert not sql.score("SELECT COUNT(*) FROM heads WHERE age > 56", rec)["execution"]  # no such table


def test_sql_value_that_equals_a_column_name():
    rec = {"instruction": "", "line": 1, "input": "table: t\ncolumns: Team, Since 2000\nQ: ?",
           "output": "SELECT Team FROM t WHERE Since 2000 = 'Since 2000'"}
    assert not sql.score("SELECT Team FROM t", rec)["execution"]
    assert sql.score('SELECT "Team" FROM "t" WHERE "Since 2000" = \'Since 2000\'', rec)["execution"]


def test_sql_runaway_query_is_stopped():
    rec = dict(WIKI, output="SELECT Player FROM 1-10015132-14 WHERE Player = 'A'")
    slow = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
            "SELECT Player FROM 1-10015132-14, c WHERE Player = 'A'")
    assert sql.score(slow, rec) == {"exact": False, "execution": False}


def test_sql_only_reads(tmp_path):
    target = tmp_path / "x.db"
    assert not sql.score(f"ATTACH DATABASE '{target}' AS x", WIKI)["execution"]
    assert not target.exists()


def test_sql_clean():
    assert sql.clean("SELECT a FROM t<END_A><START_Q>next") == "SELECT a FROM t"
    assert sql.clean("  SELECT a FROM t\nQ: another question") == "SELECT a FROM t"


# --- GSM8k ---

GSM = {"instruction": "", "input": "q", "line": 1,
       "output": "She earns 12 x 100 = <<12*100=1200>>1200 dollars.\n#### 1200"}


@pytest.mark.parametrize("pred, ok", [
    ("12 x 100 = 1200\n#### 1200", True),
    ("#### 1,200", True),
    ("#### $1,200.00", True),
    ("The answer is $1200.", True),  # no ####: the last number
    ("So she has 1,200 dollars left in total.", True),
    ("#### 1200<END_A>#### 5", True),  # cut at the end marker first
    ("She earns 1200, then spends 200. #### 1000", False),
    ("#### 120", False),
    ("#### 12000", False),
    ("#### -1200", False),
    ("I do not know", False),
    ("", False),
])
def test_gsm8k_score(pred, ok):
    assert gsm8k.score(pred, GSM) == {"correct": ok}


def test_gsm8k_final_number():
    assert gsm8k.final_number("#### 109,200,000") == 109200000
    assert gsm8k.final_number("1, 2, 3 and then 4") == 4  # list commas are not thousands
    assert gsm8k.final_number("#### -3.5") == gsm8k.final_number("-3.50")


# --- instruct ---

def test_instruct_score_is_cheap_exact():
    rec = {"instruction": "Edit", "input": "He go.", "output": "He goes.", "line": 0}
    assert instruct.score("He  goes.\n\n### Instruction:\nmore", rec) == {"exact": True}
    assert instruct.score("He went.", rec) == {"exact": False}


def test_sql_dataset_context_never_touches_the_filesystem(tmp_path):
    """A record's CREATE TABLE context is untrusted text: ATTACH, DROP, VACUUM INTO and
    load_extension are refused, an unrelated database stays byte-identical, no file appears."""
    import sqlite3
    victim = tmp_path / "users.db"
    con = sqlite3.connect(victim)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('ada')")
    con.commit()
    con.close()
    before = victim.read_bytes()
    made = tmp_path / "made.db"
    for hostile in (f"ATTACH DATABASE '{victim}' AS v; DROP TABLE v.users",
                    f"ATTACH DATABASE '{made}' AS m; CREATE TABLE m.t (a)",
                    f"CREATE TABLE t (a); VACUUM INTO '{made}'",
                    "CREATE TABLE t (a); SELECT load_extension('/tmp/evil')"):
        rec = {"instruction": "", "input": f"{hostile}; CREATE TABLE head (age INTEGER)\nQ: how many?",
               "output": "SELECT COUNT(*) FROM head", "line": 1}
        assert sql.score("SELECT COUNT(*) FROM head WHERE age > 1", rec)["execution"] is False
    assert victim.read_bytes() == before and not made.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.db"]


def test_sql_sandbox_allows_the_schema_and_stops_runaway_ddl():
    db = sql.sandbox()
    db.execute("CREATE TABLE t (a NUMERIC)")
    db.execute("INSERT INTO t VALUES (1)")
    assert db.execute("SELECT a FROM t").fetchall() == [(1,)]
    for bad in ("DROP TABLE t", "DELETE FROM t", "CREATE TRIGGER x AFTER INSERT ON t BEGIN SELECT 1; END"):
        with pytest.raises(sqlite3_error()):
            db.execute(bad)
    with pytest.raises(sqlite3_error()):  # the step budget applies to everything
        db.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                   "SELECT COUNT(*) FROM c").fetchall()


def sqlite3_error():
    import sqlite3
    return sqlite3.Error
