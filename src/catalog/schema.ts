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
  // A host is an endpoint serving VMs (a QMP socket serves one, a libvirt URI many): until v3 a row of
  // `hosts` was one QEMU VM. Each becomes a qemu host with one VM of the same name.
  `CREATE TABLE hosts_v4 (
     name TEXT PRIMARY KEY,
     kind TEXT NOT NULL,
     address TEXT NOT NULL,
     created_at TEXT NOT NULL
   );
   INSERT INTO hosts_v4 (name, kind, address, created_at)
     SELECT name, kind, json_object('qmpSocketPath', qmp_socket, 'nbdSocketPath', nbd_socket, 'qgaSocketPath', qga_socket), created_at FROM hosts;
   CREATE TABLE vms (
     name TEXT PRIMARY KEY,
     host_name TEXT NOT NULL,
     ref TEXT NOT NULL,
     uuid TEXT,
     created_at TEXT NOT NULL
   );
   INSERT INTO vms (name, host_name, ref, uuid, created_at) SELECT name, name, name, NULL, created_at FROM hosts;
   DROP TABLE hosts;
   ALTER TABLE hosts_v4 RENAME TO hosts;
   CREATE INDEX vms_by_host ON vms (host_name);`,
];

/** Brings the catalog to the latest schema (or to `target`: the migration test builds an old catalog with it). */
export function migrate(db: Database.Database, target = migrations.length): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  for (let version = current; version < target; version++) {
    db.transaction(() => {
      db.exec(migrations[version]!);
      db.pragma(`user_version = ${version + 1}`);
    })();
  }
}
