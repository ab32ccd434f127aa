import Database from 'better-sqlite3';
import { join } from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import { migrate } from './schema.ts';
import { JobStore } from './job-store.ts';
import { checkVmName } from './vm-name.ts';

/** Kinds of hypervisor endpoint snapshift can protect VMs on (src/hypervisor/registry.ts). */
export type HostKind = 'qemu' | 'libvirt';

/** One QEMU process (a VM, or qemu-storage-daemon standing in for one) reached through its QMP socket. */
export interface QemuHostRecord {
  name: string;
  kind: 'qemu';
  qmpSocketPath: string;
  /** An NBD server the host already runs (qemu-storage-daemon started with --nbd-server); else we start one. */
  nbdSocketPath: string | null;
  /** The host side of the VM's guest agent channel, for quiescing; null when the VM has none. */
  qgaSocketPath?: string | null;
  createdAt: string;
}

/** A libvirt daemon reached through a connection URI (`qemu:///system`, `qemu+unix:///system?socket=…`). */
export interface LibvirtHostRecord {
  name: string;
  kind: 'libvirt';
  uri: string;
  createdAt: string;
}

/** A hypervisor endpoint serving VMs: a QMP socket serves one VM, a libvirt URI many. */
export type HostRecord = QemuHostRecord | LibvirtHostRecord;

/** A protected VM: its name in snapshift (restore points carry it), its host and what the host calls it. */
export interface VmRecord {
  name: string;
  hostName: string;
  /** The VM on its host: a libvirt domain name; for a QEMU host, the host's one VM (its own name). */
  ref: string;
  /** The hypervisor's stable identity of the VM (libvirt domain UUID, QEMU -uuid), when it has one. */
  uuid: string | null;
  createdAt: string;
}

/** A VM with its host: what a backup task needs to reach it. */
export interface VmTarget extends VmRecord {
  host: HostRecord;
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
  /** The host the VM was on; null in rows written before hosts served several VMs (then `qmpSocketPath`). */
  hostName: string | null;
  /** The QMP socket of a qemu host (also kept for a removed host's rows); '' for other kinds. */
  qmpSocketPath: string;
  /** The process that created the snapshot; a row whose process is gone belongs to no running task. */
  ownerPid: number;
  sessionId: string;
  overlays: Array<{ baseNodeName: string; overlayNodeName: string; overlayPath: string }>;
  /** What else the host's adapter needs to find and undo the snapshot (e.g. a libvirt domain name). */
  adapter?: Record<string, unknown>;
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

  // ---- hosts (endpoints) and the VMs they serve

  /** Adds or updates a host. A qemu host serves one VM, registered with it under the host's name. */
  addHost(host: Omit<QemuHostRecord, 'createdAt'> | Omit<LibvirtHostRecord, 'createdAt'>): HostRecord {
    checkVmName(host.name);
    const createdAt = new Date().toISOString();
    const { name, kind, ...address } = host;
    this.#db.transaction(() => {
      this.#db
        .prepare('INSERT INTO hosts (name, kind, address, created_at) VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, address = excluded.address')
        .run(name, kind, JSON.stringify(address), createdAt);
      if (kind === 'qemu') this.addVm({ name, hostName: name, ref: name, uuid: null });
    })();
    return this.getHost(name)!;
  }

  /** Registers a QEMU VM by its QMP socket (a host of its own, same name) and returns it ready for a task. */
  addQemuVm(vm: { name: string; qmpSocketPath: string; nbdSocketPath?: string | null; qgaSocketPath?: string | null }): VmTarget {
    this.addHost({ kind: 'qemu', name: vm.name, qmpSocketPath: vm.qmpSocketPath, nbdSocketPath: vm.nbdSocketPath ?? null, qgaSocketPath: vm.qgaSocketPath ?? null });
    return this.getVm(vm.name)!;
  }

  getHost(name: string): HostRecord | undefined {
    const row = this.#db.prepare('SELECT * FROM hosts WHERE name = ?').get(name) as HostRow | undefined;
    return row ? hostFromRow(row) : undefined;
  }

  listHosts(): HostRecord[] {
    return (this.#db.prepare('SELECT * FROM hosts ORDER BY name').all() as HostRow[]).map(hostFromRow);
  }

  /** Forgets a host and the VMs it serves (their restore points stay in the repository). */
  removeHost(name: string): boolean {
    return this.#db.transaction(() => {
      this.#db.prepare('DELETE FROM vms WHERE host_name = ?').run(name);
      return this.#db.prepare('DELETE FROM hosts WHERE name = ?').run(name).changes > 0;
    })();
  }

  /** Adds or updates a VM of a registered host; a VM name is unique across hosts. */
  addVm(vm: Omit<VmRecord, 'createdAt'>): VmRecord {
    checkVmName(vm.name);
    const owner = this.#db.prepare('SELECT host_name FROM vms WHERE name = ?').get(vm.name) as { host_name: string } | undefined;
    if (owner && owner.host_name !== vm.hostName) {
      throw new SnapshiftError('VM_NAME_TAKEN', `a VM named "${vm.name}" is already registered on host ${owner.host_name}: give this one another name`);
    }
    this.#db
      .prepare('INSERT INTO vms (name, host_name, ref, uuid, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET ref = excluded.ref, uuid = excluded.uuid')
      .run(vm.name, vm.hostName, vm.ref, vm.uuid, new Date().toISOString());
    return this.listVms().find((candidate) => candidate.name === vm.name)!;
  }

  /** A VM with its host, or undefined if no such VM (or its host is gone). */
  getVm(name: string): VmTarget | undefined {
    const row = this.#db.prepare('SELECT * FROM vms WHERE name = ?').get(name) as VmRow | undefined;
    const host = row ? this.getHost(row.host_name) : undefined;
    return row && host ? { ...vmFromRow(row), host } : undefined;
  }

  listVms(hostName?: string): VmRecord[] {
    const rows = (
      hostName === undefined ? this.#db.prepare('SELECT * FROM vms ORDER BY name').all() : this.#db.prepare('SELECT * FROM vms WHERE host_name = ? ORDER BY name').all(hostName)
    ) as VmRow[];
    return rows.map(vmFromRow);
  }

  removeVm(name: string): boolean {
    return this.#db.prepare('DELETE FROM vms WHERE name = ?').run(name).changes > 0;
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
      .run('vm', entry.vmName, entry.qmpSocketPath, entry.ownerPid, entry.sessionId, JSON.stringify({ hostName: entry.hostName, overlays: entry.overlays, ...(entry.adapter ? { adapter: entry.adapter } : {}) }), new Date().toISOString());
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
    return rows.map((row) => {
      const details = JSON.parse(row.details) as Pick<VmSnapshotLedgerEntry, 'overlays' | 'adapter'> & { hostName?: string | null };
      return {
        id: row.id,
        vmName: row.vm_name,
        hostName: details.hostName ?? null,
        qmpSocketPath: row.qmp_socket,
        ownerPid: row.owner_pid,
        sessionId: row.session_id,
        overlays: details.overlays,
        ...(details.adapter ? { adapter: details.adapter } : {}),
        createdAt: row.created_at,
      };
    });
  }
}

interface HostRow {
  name: string;
  kind: string;
  address: string;
  created_at: string;
}
interface VmRow {
  name: string;
  host_name: string;
  ref: string;
  uuid: string | null;
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
  const address = JSON.parse(row.address) as Record<string, unknown>;
  const text = (key: string): string | null => (typeof address[key] === 'string' ? (address[key] as string) : null);
  if (row.kind === 'libvirt') return { name: row.name, kind: 'libvirt', uri: text('uri') ?? '', createdAt: row.created_at };
  return { name: row.name, kind: 'qemu', qmpSocketPath: text('qmpSocketPath') ?? '', nbdSocketPath: text('nbdSocketPath'), qgaSocketPath: text('qgaSocketPath'), createdAt: row.created_at };
}

function vmFromRow(row: VmRow): VmRecord {
  return { name: row.name, hostName: row.host_name, ref: row.ref, uuid: row.uuid, createdAt: row.created_at };
}
