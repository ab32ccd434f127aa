import { promises as fs } from 'node:fs';
import { join } from 'node:path';
import type { OwnedProcess } from '../../core/owned-process.ts';
import type { QemuVmConfiguration } from '../../hypervisor/hypervisor.ts';

/**
 * One instant recovery as it is recorded on disk, so that `list`, `stop` and `migrate` (other processes,
 * later) find what `start` left running: the NBD server serving the restore point, the VM's QEMU, and the
 * overlays that take the VM's writes.
 */
export interface InstantRecoveryRecord {
  version: 1;
  /** The recovered VM's name (the source's, or --name). */
  name: string;
  sourceVm: string;
  restorePoint: string;
  pointCreatedAt: string;
  repository: string;
  startedAt: string;
  /** The `instant-recovery start` process: while it lives and the VM is not recorded yet, the start is under way. */
  startedBy?: number;
  /** running: served from the backup; migrated: its disks now live on a datastore and nothing is served. */
  state: 'running' | 'migrated';
  /** The NBD server (`snapshift serve`), one export per disk on `socketPath`. */
  server: OwnedProcess & { socketPath: string };
  vm: OwnedProcess & { qmpSocketPath: string; runDir: string };
  disks: Array<{ name: string; sizeBytes: number; overlayPath: string; nodeName: string; backupNodeName: string }>;
  /** Where `migrate` moved the disks. */
  datastore?: { folder: string; disks: Array<{ name: string; path: string }> };
  /** What the VM was started with besides its disks, so it can be started again on migrated disks. */
  launch: { uuid: string; macs: string[]; network: 'none' | 'user'; configuration: QemuVmConfiguration };
  /** Boot verification runs are discarded by `verify-boot` itself and shown as such. */
  purpose: 'recovery' | 'boot-verification';
}

/** The folder of one instant recovery: state.json, the overlays, the server's socket and logs. */
export function recoveryFolder(home: string, name: string): string {
  return join(home, 'instant-recovery', name);
}

/** The run folder of a VM snapshift started (QMP socket, serial logs and sockets); it outlives a migrated recovery. */
export function vmRunFolder(home: string, name: string): string {
  return join(home, 'run', 'vms', name);
}

export async function readRecord(home: string, name: string): Promise<InstantRecoveryRecord | undefined> {
  try {
    return JSON.parse(await fs.readFile(join(recoveryFolder(home, name), 'state.json'), 'utf8')) as InstantRecoveryRecord;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
}

/** Written whole to a temp file and renamed, so a reader never sees half a record. */
export async function writeRecord(home: string, record: InstantRecoveryRecord): Promise<void> {
  const folder = recoveryFolder(home, record.name);
  const temp = join(folder, `state.json.${process.pid}.tmp`);
  await fs.writeFile(temp, `${JSON.stringify(record, null, 2)}\n`);
  await fs.rename(temp, join(folder, 'state.json'));
}

export async function listRecords(home: string): Promise<InstantRecoveryRecord[]> {
  const names = await fs.readdir(join(home, 'instant-recovery')).catch(() => [] as string[]);
  const records: InstantRecoveryRecord[] = [];
  for (const name of names.sort()) {
    const record = await readRecord(home, name);
    if (record) records.push(record);
  }
  return records;
}
