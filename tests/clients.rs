//! Real clients against a real server, the way analysts and applications use freshet:
//! psql's meta-commands, pgjdbc's DatabaseMetaData and prepared statements, and Python's
//! psycopg 3, SQLAlchemy 2 inspection and pandas. scripts/test installs the clients
//! (postgresql-client, libpostgresql-jdbc-java with a JDK, and the Python packages).

mod common;

use std::path::Path;
use std::process::Command;

use common::{TestServer, run_program, stdout_of};

/// A table, a materialized view over it and a plain view, with rows; and a table whose
/// primary key lists its columns out of table order, with a column DEFAULT.
async fn server_with_catalog() -> TestServer {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE readings (id INT PRIMARY KEY, device TEXT NOT NULL, temperature DOUBLE PRECISION, at TIMESTAMP);
             INSERT INTO readings VALUES (1, 'd-1', 21.5, '2024-05-01 10:00:00'), (2, 'd-1', 19.0, '2024-05-01 10:01:00'),
                                         (3, 'd-2', 30.0, '2024-05-01 10:02:00');
             CREATE MATERIALIZED VIEW per_device AS
               SELECT device, avg(temperature) AS avg_temp, count(*) AS n FROM readings GROUP BY device;
             CREATE VIEW hot AS SELECT id, device FROM readings WHERE temperature > 20;
             CREATE TABLE stations (region TEXT, id INT, name TEXT NOT NULL DEFAULT 'unnamed', PRIMARY KEY (id, region));
             FLUSH;",
        )
        .await
        .expect("catalog created");
    server
}

fn psql(server: &TestServer, args: &[&str]) -> Command {
    let addr = server.server.pg_addr();
    let mut command = Command::new("psql");
    command
        .args(["-X", "-A", "-v", "ON_ERROR_STOP=1", "-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-U", "freshet", "-d", "freshet"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10");
    command
}

async fn psql_out(server: &TestServer, args: &[&str]) -> String {
    stdout_of(&run_program(psql(server, args), "psql").await, &format!("psql {args:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_meta_commands_describe_tables_and_views() {
    let server = server_with_catalog().await;

    let tables = psql_out(&server, &["-c", r"\dt"]).await;
    assert!(tables.contains("public|readings|table|freshet"), "{tables}");
    assert!(!tables.contains("per_device") && !tables.contains("hot"), "only tables: {tables}");

    let views = psql_out(&server, &["-c", r"\dv"]).await;
    assert!(views.contains("public|hot|view|freshet"), "{views}");
    assert!(!views.contains("per_device"), "materialized views are listed by \\dm: {views}");

    let matviews = psql_out(&server, &["-c", r"\dm"]).await;
    assert!(matviews.contains("public|per_device|materialized view|freshet"), "{matviews}");

    let all = psql_out(&server, &["-c", r"\d"]).await;
    for line in ["public|readings|table", "public|hot|view", "public|per_device|materialized view"] {
        assert!(all.contains(line), "\\d lists {line}: {all}");
    }

    let table = psql_out(&server, &["-c", r"\d+ readings"]).await;
    assert!(table.contains("Table \"public.readings\""), "{table}");
    for column in
        ["id|integer|", "device|text||not null|", "temperature|double precision|", "at|timestamp without time zone|"]
    {
        assert!(table.contains(column), "\\d+ readings shows {column}: {table}");
    }

    let view = psql_out(&server, &["-c", r"\d+ hot"]).await;
    assert!(view.contains("View \"public.hot\"") && view.contains("id|integer|"), "{view}");
    assert!(view.contains("View definition:\nSELECT id, device FROM readings WHERE temperature > 20"), "{view}");

    let matview = psql_out(&server, &["-c", r"\d per_device"]).await;
    assert!(matview.contains("Materialized view \"public.per_device\""), "{matview}");
    assert!(matview.contains("avg_temp|double precision") && matview.contains("n|bigint"), "{matview}");
    // psql shows a materialized view's query, as it does a plain view's.
    let matview = psql_out(&server, &["-c", r"\d+ per_device"]).await;
    assert!(
        matview.contains(
            "View definition:\nSELECT device, avg(temperature) AS avg_temp, count(*) AS n FROM readings GROUP BY device"
        ),
        "{matview}"
    );
    // The primary key is an index of the table, and the DEFAULT column shows defaults.
    let keyed = psql_out(
        &server,
        &["-c", "CREATE TABLE sites (id INT PRIMARY KEY, name TEXT NOT NULL DEFAULT 'unnamed')", "-c", r"\d sites"],
    )
    .await;
    assert!(keyed.contains("Indexes:\n    \"sites_pkey\" PRIMARY KEY, btree (id)"), "{keyed}");
    assert!(keyed.contains("name|text||not null|'unnamed'"), "{keyed}");

    // An index relation describes its key columns, in key order.
    let index = psql_out(&server, &["-c", r"\d stations_pkey"]).await;
    assert!(index.contains("Index \"public.stations_pkey\""), "{index}");
    assert!(index.contains("id|integer|yes|id\nregion|text|yes|region"), "{index}");
    assert!(index.contains("primary key, btree, for table \"public.stations\""), "{index}");

    // Sizes are the bytes of the rows held in memory: a table with rows has some, one
    // without and a view have none.
    let sizes = psql_out(&server, &["-c", r"\dt+"]).await;
    let size_of = |listing: &str, name: &str| -> Option<i64> {
        let line = listing.lines().find(|l| l.starts_with(&format!("public|{name}|")))?;
        line.split('|').find_map(|field| field.strip_suffix(" bytes").or(field.strip_suffix(" kB"))?.parse().ok())
    };
    assert!(size_of(&sizes, "readings").is_some_and(|bytes| bytes > 0), "{sizes}");
    assert_eq!(size_of(&sizes, "stations"), Some(0), "{sizes}");
    let views = psql_out(&server, &["-c", r"\dv+"]).await;
    assert_eq!(size_of(&views, "hot"), Some(0), "{views}");

    let databases = psql_out(&server, &["-c", r"\l"]).await;
    assert!(databases.lines().any(|l| l.starts_with("freshet|freshet|")), "{databases}");
    let databases = psql_out(&server, &["-c", r"\l+"]).await;
    assert!(databases.lines().any(|l| l.starts_with("freshet|freshet|") && l.contains(" bytes|")), "{databases}");
    let schemas = psql_out(&server, &["-c", r"\dn"]).await;
    assert!(schemas.contains("public|freshet"), "{schemas}");
    let roles = psql_out(&server, &["-c", r"\du"]).await;
    assert!(roles.lines().any(|l| l.starts_with("freshet|Superuser")), "{roles}");
    let functions = psql_out(&server, &["-c", r"\df"]).await;
    assert!(
        functions.contains("Schema|Name|Result data type|Argument data types|Type") && functions.contains("(0 rows)")
    );

    // The catalog follows the current snapshot: a table created in this session appears.
    let later = psql_out(&server, &["-c", "CREATE TABLE later (x BIGINT)", "-c", r"\dt"]).await;
    assert!(later.contains("public|later|table"), "{later}");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_lists_tables_and_columns_and_runs_prepared_statements() {
    let server = server_with_catalog().await;
    let classes = tempfile::tempdir().expect("temp dir");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/JdbcCheck.java");
    let mut javac = Command::new("javac");
    javac.arg("-d").arg(classes.path()).arg(&source);
    stdout_of(&run_program(javac, "javac").await, "javac JdbcCheck.java");

    let addr = server.server.pg_addr();
    let url = format!("jdbc:postgresql://{}:{}/freshet", addr.ip(), addr.port());
    let mut java = Command::new("java");
    java.arg("-cp").arg(format!("{}:{}", JDBC_JAR, classes.path().display())).args(["JdbcCheck", &url, "freshet", ""]);
    let out = stdout_of(&run_program(java, "java").await, "java JdbcCheck");

    let lines: Vec<&str> = out.lines().collect();
    for expected in [
        "table readings TABLE",
        "table hot VIEW",
        "table per_device MATERIALIZED VIEW",
        "column id int4 4 nullable=NO",
        "column device text 12 nullable=NO",
        "column temperature float8 8 nullable=YES",
        "column at timestamp 93 nullable=YES",
        "primary key readings id 1 readings_pkey",
        "primary key columns readings 1",
        "primary key columns per_device 0",
        // getIndexInfo: the primary-key index, unique, its columns in key order.
        "index readings readings_pkey unique 1 id A",
        "index stations stations_pkey unique 1 id A",
        "index stations stations_pkey unique 2 region A",
        "index columns stations 2",
        "row d-1 21.5",
        "inserted 1",
        "in transaction count 2",
        "application_name jdbc-check",
        // getSchemas, getCatalogs and getTypeInfo: freshet's schema, database and types.
        "schema public",
        "schema pg_catalog",
        "schema information_schema",
        "catalog freshet",
        "type int4 4",
        "type int8 -5",
        "type text 12",
        "type float8 8",
        "type timestamp 93",
        "type bool -7",
        // freshet has no foreign keys or procedures: empty, as Postgres answers without them.
        "foreign keys readings imported 0 exported 0",
        "foreign keys stations imported 0 exported 0",
        "procedures public 0",
    ] {
        assert!(lines.contains(&expected), "pgjdbc printed {expected:?}:\n{out}");
    }
    assert!(out.starts_with("product PostgreSQL 16.6"), "{out}");
    server.server.shutdown().await;
}

/// Debian's libpostgresql-jdbc-java.
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_sqlalchemy_and_pandas_read_the_catalog_and_a_view() {
    let server = server_with_catalog().await;
    let addr = server.server.pg_addr();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/python_check.py");
    let mut python = Command::new("python3");
    python.arg(&script).args([addr.ip().to_string(), addr.port().to_string(), "freshet".into(), String::new()]);
    let out = stdout_of(&run_program(python, "python3").await, "python_check.py");

    let lines: Vec<&str> = out.lines().collect();
    for expected in [
        "row d-1 21.5",
        "inserted 1",
        "tables ['readings', 'stations']",
        "views ['hot']",
        "matviews ['per_device']",
        "column id INTEGER not null",
        "column device TEXT not null",
        "column temperature DOUBLE PRECISION nullable",
        "column at TIMESTAMP nullable",
        // get_pk_constraint: the key's name and its columns in key order, not table order.
        "pk stations stations_pkey ['id', 'region']",
        "pk readings readings_pkey ['id']",
        // The default, and the collation SQLAlchemy tests with a subquery in a CASE
        // condition: computed (freshet's columns have no collation of their own), not a
        // NULL stamped on the unplannable.
        "default stations region None collation None",
        "default stations name 'unnamed' collation None",
        "schemas ['freshet_catalog', 'information_schema', 'public']",
        "has_table readings True",
        "has_table hot True",
        "has_table per_device True",
        "has_table nope False",
        // A primary key's index is the key's, which get_indexes leaves out, as on Postgres;
        // freshet has no other indexes and no unique, foreign-key or check constraints.
        "indexes readings []",
        "indexes stations []",
        "unique stations []",
        "foreign keys stations []",
        "checks stations []",
        "view definition hot SELECT id, device FROM readings WHERE temperature > 20",
        "view definition per_device SELECT device, avg(temperature) AS avg_temp, count(*) AS n FROM readings GROUP BY device",
        "frame d-1 20.25 2",
        "frame d-2 30.0 1",
        "frame d-8 2.5 1",
    ] {
        assert!(lines.contains(&expected), "python printed {expected:?}:\n{out}");
    }
    server.server.shutdown().await;
}
