// Drives freshet with pgjdbc the way an application does: connect, list tables and views
// through DatabaseMetaData, list columns with their JDBC types, primary keys and indexes, schemas,
// catalogs, types, foreign keys and procedures (freshet has none of either), and run a prepared
// statement with parameters. Prints one line per fact; tests/clients.rs checks them.
//
// Usage: java -cp postgresql.jar:DIR JdbcCheck JDBC_URL USER PASSWORD
import java.sql.*;

public class JdbcCheck {
    public static void main(String[] args) throws Exception {
        try (Connection conn = DriverManager.getConnection(args[0], args[1], args[2])) {
            DatabaseMetaData meta = conn.getMetaData();
            System.out.println("product " + meta.getDatabaseProductName() + " " + meta.getDatabaseProductVersion());
            String[] types = {"TABLE", "VIEW", "MATERIALIZED VIEW"};
            try (ResultSet rs = meta.getTables(null, "public", "%", types)) {
                while (rs.next()) {
                    System.out.println("table " + rs.getString("TABLE_NAME") + " " + rs.getString("TABLE_TYPE"));
                }
            }
            try (ResultSet rs = meta.getColumns(null, "public", "readings", null)) {
                while (rs.next()) {
                    System.out.println("column " + rs.getString("COLUMN_NAME") + " " + rs.getString("TYPE_NAME")
                        + " " + rs.getInt("DATA_TYPE") + " nullable=" + rs.getString("IS_NULLABLE"));
                }
            }
            for (String table : new String[]{"readings", "per_device"}) {
                try (ResultSet rs = meta.getPrimaryKeys(null, "public", table)) {
                    int keys = 0;
                    while (rs.next()) {
                        keys++;
                        System.out.println("primary key " + rs.getString("TABLE_NAME") + " " + rs.getString("COLUMN_NAME")
                            + " " + rs.getInt("KEY_SEQ") + " " + rs.getString("PK_NAME"));
                    }
                    System.out.println("primary key columns " + table + " " + keys);
                }
            }
            for (String table : new String[]{"readings", "stations"}) {
                try (ResultSet rs = meta.getIndexInfo(null, "public", table, false, false)) {
                    int columns = 0;
                    while (rs.next()) {
                        columns++;
                        System.out.println("index " + rs.getString("TABLE_NAME") + " " + rs.getString("INDEX_NAME")
                            + " " + (rs.getBoolean("NON_UNIQUE") ? "non-unique" : "unique") + " "
                            + rs.getInt("ORDINAL_POSITION") + " " + rs.getString("COLUMN_NAME") + " " + rs.getString("ASC_OR_DESC"));
                    }
                    System.out.println("index columns " + table + " " + columns);
                }
            }
            try (ResultSet rs = meta.getSchemas()) {
                while (rs.next()) {
                    System.out.println("schema " + rs.getString("TABLE_SCHEM"));
                }
            }
            try (ResultSet rs = meta.getCatalogs()) {
                while (rs.next()) {
                    System.out.println("catalog " + rs.getString("TABLE_CAT"));
                }
            }
            try (ResultSet rs = meta.getTypeInfo()) {
                while (rs.next()) {
                    System.out.println("type " + rs.getString("TYPE_NAME") + " " + rs.getInt("DATA_TYPE"));
                }
            }
            for (String table : new String[]{"readings", "stations"}) {
                int imported = 0;
                try (ResultSet rs = meta.getImportedKeys(null, "public", table)) {
                    while (rs.next()) {
                        imported++;
                    }
                }
                int exported = 0;
                try (ResultSet rs = meta.getExportedKeys(null, "public", table)) {
                    while (rs.next()) {
                        exported++;
                    }
                }
                System.out.println("foreign keys " + table + " imported " + imported + " exported " + exported);
            }
            try (ResultSet rs = meta.getProcedures(null, "public", "%")) {
                int procedures = 0;
                while (rs.next()) {
                    procedures++;
                }
                System.out.println("procedures public " + procedures);
            }
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT device, temperature FROM readings WHERE device = ? AND temperature > ? ORDER BY temperature")) {
                ps.setString(1, "d-1");
                ps.setDouble(2, 20.0);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        System.out.println("row " + rs.getString(1) + " " + rs.getDouble(2));
                    }
                }
            }
            try (PreparedStatement ps = conn.prepareStatement(
                    "INSERT INTO readings (id, device, temperature) VALUES (?, ?, ?)")) {
                ps.setInt(1, 100);
                ps.setString(2, "d-9");
                ps.setDouble(3, 1.25);
                System.out.println("inserted " + ps.executeUpdate());
            }
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT count(*) FROM readings WHERE device = 'd-1'")) {
                rs.next();
                System.out.println("in transaction count " + rs.getLong(1));
            }
            conn.commit();
            conn.setAutoCommit(true);
            try (Statement st = conn.createStatement()) {
                st.execute("SET application_name = 'jdbc-check'");
                try (ResultSet rs = st.executeQuery("SHOW application_name")) {
                    rs.next();
                    System.out.println("application_name " + rs.getString(1));
                }
            }
        }
    }
}
