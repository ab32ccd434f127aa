import type Database from 'better-sqlite3';

/** Schema migrations, applied in order; `user_version` records how far a catalog has come. */
const migrations: string[] = [
  `CREATE TABLE hosts (
     name TEXT PRIMARY KEY,
     kind TEXT NOT NULL,
     qmp_socket TEXT NOT NULL,
     nbd_socket TEXT,
     created_at TEXT NOT NULL
   );
   CREATE TABLE disks (
     vm_name TEXT NOT NULL,
     name TEXT NOT NULL,
     node_name TEXT NOT NULL,
     image_path TEXT NOT NULL,
     format TEXT NOT NULL,
     virtual_size INTEGER NOT NULL,
     seen_at TEXT NOT NULL,
     PRIMARY KEY (vm_name, name)
   );
   CREATE TABLE restore_points (
     id TEXT PRIMARY KEY,
     vm_name TEXT NOT NULL,
     repository TEXT NOT NULL,
     created_at TEXT NOT NULL,
     mode TEXT NOT NULL,
     stats TEXT NOT NULL
   );
   CREATE INDEX restore_points_by_vm ON restore_points (vm_name, created_at);
   CREATE TABLE snapshot_ledger (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     kind TEXT NOT NULL,
     vm_name TEXT NOT NULL,
     qmp_socket TEXT NOT NULL,
     owner_pid INTEGER NOT NULL,
     session_id TEXT NOT NULL,
     details TEXT NOT NULL,
     created_at TEXT NOT NULL
   );`,
  `CREATE TABLE jobs (
     name TEXT PRIMARY KEY,
     definition TEXT NOT NULL,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );
   CREATE TABLE sessions (
     id TEXT PRIMARY KEY,
     job_name TEXT,
     state TEXT NOT NULL,
     started_at TEXT NOT NULL,
     ended_at TEXT,
     owner_pid INTEGER NOT NULL,
     summary TEXT NOT NULL
   );
   CREATE INDEX sessions_by_job ON sessions (job_name, started_at);
   CREATE TABLE tasks (
     session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
     vm_name TEXT NOT NULL,
     state TEXT NOT NULL,
     restore_point_id TEXT,
     reason TEXT,
     stats TEXT,
     PRIMARY KEY (session_id, vm_name)
   );`,
  `ALTER TABLE hosts ADD COLUMN qga_socket TEXT;`,
];

export function migrate(db: Database.Database): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  for (let version = current; version < migrations.length; version++) {
    db.transaction(() => {
      db.exec(migrations[version]!);
      db.pragma(`user_version = ${version + 1}`);
    })();
  }
}
