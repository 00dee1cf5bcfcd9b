"""Drives freshet with Python's Postgres stack the way an analyst does: psycopg 3 with
parameters, SQLAlchemy 2 inspection (schemas, tables, views and their definitions, columns
with defaults and collations, primary keys, indexes and the constraints freshet does not
have), and pandas.read_sql of a view. Prints one line per
fact; tests/clients.rs checks them.

Usage: python3 python_check.py HOST PORT USER PASSWORD
"""
import sys

import pandas
import psycopg
import sqlalchemy

host, port, user, password = sys.argv[1:5]

with psycopg.connect(host=host, port=port, user=user, password=password, dbname="freshet") as conn:
    print("psycopg", psycopg.__version__, "server", conn.info.server_version)
    with conn.cursor() as cur:
        cur.execute("SELECT device, temperature FROM readings WHERE device = %s AND temperature > %s ORDER BY temperature",
                    ("d-1", 20.0))
        for device, temperature in cur.fetchall():
            print("row", device, temperature)
        cur.execute("INSERT INTO readings (id, device, temperature) VALUES (%s, %s, %s)", (200, "d-8", 2.5))
        print("inserted", cur.rowcount)
    conn.commit()
    # Wait until the materialized view includes the insert.
    conn.execute("FLUSH")
    conn.commit()

url = f"postgresql+psycopg://{user}:{password}@{host}:{port}/freshet"
engine = sqlalchemy.create_engine(url)
inspector = sqlalchemy.inspect(engine)
print("sqlalchemy", sqlalchemy.__version__)
print("tables", sorted(inspector.get_table_names()))
print("views", sorted(inspector.get_view_names()))
print("matviews", sorted(inspector.get_materialized_view_names()))
for column in inspector.get_columns("readings"):
    print("column", column["name"], str(column["type"]), "nullable" if column["nullable"] else "not null")
for table in ("stations", "readings"):
    pk = inspector.get_pk_constraint(table)
    print("pk", table, pk["name"], pk["constrained_columns"])
for column in inspector.get_columns("stations"):
    print("default stations", column["name"], column["default"], "collation", column.get("collation"))
print("schemas", inspector.get_schema_names())
for table in ("readings", "hot", "per_device", "nope"):
    print("has_table", table, inspector.has_table(table))
for table in ("readings", "stations"):
    print("indexes", table, inspector.get_indexes(table))
    print("unique", table, inspector.get_unique_constraints(table))
    print("foreign keys", table, inspector.get_foreign_keys(table))
    print("checks", table, inspector.get_check_constraints(table))
for view in ("hot", "per_device"):
    print("view definition", view, inspector.get_view_definition(view))

with engine.connect() as conn:
    frame = pandas.read_sql("SELECT * FROM per_device ORDER BY device", conn)
print("pandas", pandas.__version__)
for record in frame.to_dict("records"):
    print("frame", record["device"], record["avg_temp"], record["n"])
