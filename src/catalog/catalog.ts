import Database from 'better-sqlite3';
import { join } from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import { migrate } from './schema.ts';
import { JobStore } from './job-store.ts';
import { checkVmName } from './vm-name.ts';

export interface HostRecord {
  name: string;
  kind: 'qemu';
  qmpSocketPath: string;
  /** An NBD server the host already runs (qemu-storage-daemon started with --nbd-server); else we start one. */
  nbdSocketPath: string | null;
  /** The host side of the VM's guest agent channel, for quiescing; null when the VM has none. */
  qgaSocketPath?: string | null;
  createdAt: string;
}

export interface RestorePointRecord {
  id: string;
  vmName: string;
  repositoryPath: string;
  createdAt: string;
  mode: string;
  stats: Record<string, unknown>;
}

/** What the ledger holds about one VM snapshot: enough to find and commit its overlays after a crash. */
export interface VmSnapshotLedgerEntry {
  id: number;
  vmName: string;
  qmpSocketPath: string;
  /** The process that created the snapshot; a row whose process is gone belongs to no running task. */
  ownerPid: number;
  sessionId: string;
  overlays: Array<{ baseNodeName: string; overlayNodeName: string; overlayPath: string }>;
  createdAt: string;
}

/** A storage snapshot we asked for: which system, which volumes, which session (its names carry the tag). */
export interface StorageSnapshotLedgerEntry {
  id: number;
  vmNames: string[];
  ownerPid: number;
  sessionId: string;
  systemKind: string;
  volumes: Array<{ kind: string; id: string }>;
  sessionTag: string;
  createdAt: string;
}

/**
 * The catalog: hosts, VMs, restore points and the snapshot ledger, in one SQLite file under the home folder.
 * WAL mode so a CLI reading sessions never blocks a running backup.
 */
export class Catalog implements Disposable {
  readonly #db: Database.Database;

  /** Jobs, sessions and tasks. */
  readonly jobs: JobStore;

  private constructor(db: Database.Database) {
    this.#db = db;
    this.jobs = new JobStore(db);
  }

  static open(home: string): Catalog {
    const path = join(home, 'catalog.sqlite');
    let db: Database.Database;
    try {
      db = new Database(path);
    } catch (error) {
      throw new SnapshiftError('CATALOG_OPEN_FAILED', `cannot open the catalog ${path}: ${(error as Error).message}`, { cause: error });
    }
    db.pragma('journal_mode = WAL');
    db.pragma('busy_timeout = 10000');
    db.pragma('foreign_keys = ON');
    migrate(db);
    return new Catalog(db);
  }

  close(): void {
    if (this.#db.open) this.#db.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  // ---- hosts (for QEMU one host is one QEMU process, hence one VM of the same name)

  addHost(host: Omit<HostRecord, 'createdAt'>): HostRecord {
    checkVmName(host.name);
    const createdAt = new Date().toISOString();
    this.#db
      .prepare(
        `INSERT INTO hosts (name, kind, qmp_socket, nbd_socket, qga_socket, created_at) VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, qmp_socket = excluded.qmp_socket, nbd_socket = excluded.nbd_socket, qga_socket = excluded.qga_socket`,
      )
      .run(host.name, host.kind, host.qmpSocketPath, host.nbdSocketPath, host.qgaSocketPath ?? null, createdAt);
    return this.getHost(host.name)!;
  }

  getHost(name: string): HostRecord | undefined {
    const row = this.#db.prepare('SELECT * FROM hosts WHERE name = ?').get(name) as HostRow | undefined;
    return row ? hostFromRow(row) : undefined;
  }

  listHosts(): HostRecord[] {
    return (this.#db.prepare('SELECT * FROM hosts ORDER BY name').all() as HostRow[]).map(hostFromRow);
  }

  removeHost(name: string): boolean {
    return this.#db.prepare('DELETE FROM hosts WHERE name = ?').run(name).changes > 0;
  }

  // ---- disks seen at the last backup

  recordDisks(vmName: string, disks: Array<{ name: string; nodeName: string; imagePath: string; format: string; virtualSizeBytes: number }>): void {
    const now = new Date().toISOString();
    const replace = this.#db.transaction(() => {
      this.#db.prepare('DELETE FROM disks WHERE vm_name = ?').run(vmName);
      const insert = this.#db.prepare(
        'INSERT INTO disks (vm_name, name, node_name, image_path, format, virtual_size, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)',
      );
      for (const disk of disks) insert.run(vmName, disk.name, disk.nodeName, disk.imagePath, disk.format, disk.virtualSizeBytes, now);
    });
    replace();
  }

  // ---- restore points (the repository is the truth; the catalog remembers where each one lives)

  addRestorePoint(point: RestorePointRecord): void {
    this.#db
      .prepare('INSERT OR REPLACE INTO restore_points (id, vm_name, repository, created_at, mode, stats) VALUES (?, ?, ?, ?, ?, ?)')
      .run(point.id, point.vmName, point.repositoryPath, point.createdAt, point.mode, JSON.stringify(point.stats));
  }

  listRestorePoints(vmName?: string): RestorePointRecord[] {
    const rows = (
      vmName === undefined
        ? this.#db.prepare('SELECT * FROM restore_points ORDER BY created_at').all()
        : this.#db.prepare('SELECT * FROM restore_points WHERE vm_name = ? ORDER BY created_at').all(vmName)
    ) as RestorePointRow[];
    return rows.map((row) => ({
      id: row.id,
      vmName: row.vm_name,
      repositoryPath: row.repository,
      createdAt: row.created_at,
      mode: row.mode,
      stats: JSON.parse(row.stats) as Record<string, unknown>,
    }));
  }

  /** The repository a VM was last backed up to, so `--repo` may be left out. */
  lastRepositoryOf(vmName: string): string | undefined {
    const row = this.#db.prepare('SELECT repository FROM restore_points WHERE vm_name = ? ORDER BY created_at DESC LIMIT 1').get(vmName) as
      | { repository: string }
      | undefined;
    return row?.repository;
  }

  removeRestorePoints(ids: readonly string[]): void {
    const remove = this.#db.prepare('DELETE FROM restore_points WHERE id = ?');
    this.#db.transaction(() => ids.forEach((id) => remove.run(id)))();
  }

  // ---- the snapshot ledger: written before QMP is called, cleared after the commit

  recordVmSnapshotIntent(entry: Omit<VmSnapshotLedgerEntry, 'id' | 'createdAt'>): number {
    const result = this.#db
      .prepare('INSERT INTO snapshot_ledger (kind, vm_name, qmp_socket, owner_pid, session_id, details, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)')
      .run('vm', entry.vmName, entry.qmpSocketPath, entry.ownerPid, entry.sessionId, JSON.stringify({ overlays: entry.overlays }), new Date().toISOString());
    return Number(result.lastInsertRowid);
  }

  clearLedgerEntry(id: number): void {
    this.#db.prepare('DELETE FROM snapshot_ledger WHERE id = ?').run(id);
  }

  /** The intent to snapshot storage volumes, written before the storage system is asked. */
  recordStorageSnapshotIntent(entry: Omit<StorageSnapshotLedgerEntry, 'id' | 'createdAt'>): number {
    const result = this.#db
      .prepare('INSERT INTO snapshot_ledger (kind, vm_name, qmp_socket, owner_pid, session_id, details, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)')
      .run('storage', entry.vmNames.join(','), '', entry.ownerPid, entry.sessionId, JSON.stringify({ systemKind: entry.systemKind, volumes: entry.volumes, sessionTag: entry.sessionTag }), new Date().toISOString());
    return Number(result.lastInsertRowid);
  }

  listStorageSnapshotLedger(): StorageSnapshotLedgerEntry[] {
    const rows = this.#db.prepare("SELECT * FROM snapshot_ledger WHERE kind = 'storage' ORDER BY id").all() as LedgerRow[];
    return rows.map((row) => {
      const details = JSON.parse(row.details) as Pick<StorageSnapshotLedgerEntry, 'systemKind' | 'volumes' | 'sessionTag'>;
      return { id: row.id, vmNames: row.vm_name.split(','), ownerPid: row.owner_pid, sessionId: row.session_id, createdAt: row.created_at, ...details };
    });
  }

  /** Every volume a disk we backed up was found on: where the hunter looks for our storage snapshots. */
  knownImagePaths(): string[] {
    return (this.#db.prepare('SELECT DISTINCT image_path FROM disks').all() as Array<{ image_path: string }>).map((row) => row.image_path);
  }

  listVmSnapshotLedger(vmName?: string): VmSnapshotLedgerEntry[] {
    const rows = (
      vmName === undefined
        ? this.#db.prepare("SELECT * FROM snapshot_ledger WHERE kind = 'vm' ORDER BY id").all()
        : this.#db.prepare("SELECT * FROM snapshot_ledger WHERE kind = 'vm' AND vm_name = ? ORDER BY id").all(vmName)
    ) as LedgerRow[];
    return rows.map((row) => ({
      id: row.id,
      vmName: row.vm_name,
      qmpSocketPath: row.qmp_socket,
      ownerPid: row.owner_pid,
      sessionId: row.session_id,
      overlays: (JSON.parse(row.details) as { overlays: VmSnapshotLedgerEntry['overlays'] }).overlays,
      createdAt: row.created_at,
    }));
  }
}

interface HostRow {
  name: string;
  kind: 'qemu';
  qmp_socket: string;
  nbd_socket: string | null;
  qga_socket: string | null;
  created_at: string;
}
interface RestorePointRow {
  id: string;
  vm_name: string;
  repository: string;
  created_at: string;
  mode: string;
  stats: string;
}
interface LedgerRow {
  id: number;
  kind: string;
  vm_name: string;
  qmp_socket: string;
  owner_pid: number;
  session_id: string;
  details: string;
  created_at: string;
}

function hostFromRow(row: HostRow): HostRecord {
  return { name: row.name, kind: row.kind, qmpSocketPath: row.qmp_socket, nbdSocketPath: row.nbd_socket, qgaSocketPath: row.qga_socket, createdAt: row.created_at };
}
