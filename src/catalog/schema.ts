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
