import { processIsAlive } from '../core/process-alive.ts';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import { isDatastoreKind, type DatastoreKind } from './lab-layout.ts';
import type { ZfsRecord } from './lab-zfs.ts';

/**
 * A datastore as `lab up` made it. Each field is written before the thing it names is made (image file,
 * then loop device, then mount), so `lab down` after a crash knows everything that may exist.
 */
export interface DatastoreRecord {
  kind: DatastoreKind;
  imagePath: string;
  sizeBytes: number;
  /** Set right after `losetup` returned it; down also finds loops by backing file (losetup -j) if unset. */
  loopDevice?: string;
  mountPoint: string;
}

/** A long-running process we started; killed only if /proc/PID/cmdline still equals `cmdline`. */
export interface ProcessRecord {
  /** Who owns it, e.g. "vm:web1"; unique in a lab. */
  label: string;
  pid: number;
  cmdline: string[];
  startedAt: string;
}

/** A VM defined in the lab (its disk); whether it runs is in `processes` under label `vm:<name>`. */
export interface VmRecord {
  name: string;
  datastore: DatastoreKind;
  diskPath: string;
  sizeBytes: number;
  fillBytes: number;
  createdAt: string;
}

export interface LabState {
  version: 1;
  dir: string;
  createdAt: string;
  datastores: DatastoreRecord[];
  processes: ProcessRecord[];
  vms: VmRecord[];
  /** The ZFS datastore, when `lab zfs up` (or `lab up --with-zfs`) made one. */
  zfs?: ZfsRecord;
}

export function emptyLabState(dir: string): LabState {
  return { version: 1, dir, createdAt: new Date().toISOString(), datastores: [], processes: [], vms: [] };
}

/** Reads the state file; undefined when there is none (no lab here). */
export async function readLabState(file: string): Promise<LabState | undefined> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
  try {
    return parseLabState(JSON.parse(text));
  } catch (error) {
    throw new SnapshiftError('LAB_STATE_BAD', `lab state file ${file} is unreadable (${error instanceof Error ? error.message : String(error)}); remove what it names by hand`, { cause: error });
  }
}

/** Temp file + fsync + rename, so a crash leaves either the old or the new state, never half of one. */
export async function writeLabState(file: string, state: LabState): Promise<void> {
  await fs.mkdir(path.dirname(file), { recursive: true });
  const temp = `${file}.${process.pid}.tmp`;
  const handle = await fs.open(temp, 'w', 0o644);
  try {
    await handle.writeFile(`${JSON.stringify(state, null, 2)}\n`);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.rename(temp, file);
}

function parseLabState(value: unknown): LabState {
  const record = object(value, 'state');
  if (record['version'] !== 1) throw new Error(`unknown version ${String(record['version'])}`);
  return {
    version: 1,
    dir: string(record['dir'], 'dir'),
    createdAt: string(record['createdAt'], 'createdAt'),
    datastores: array(record['datastores'], 'datastores').map((item) => {
      const d = object(item, 'datastore');
      const kind = string(d['kind'], 'datastore.kind');
      if (!isDatastoreKind(kind)) throw new Error(`unknown datastore kind ${kind}`);
      const loopDevice = d['loopDevice'] === undefined ? undefined : string(d['loopDevice'], 'loopDevice');
      return {
        kind,
        imagePath: string(d['imagePath'], 'imagePath'),
        sizeBytes: number(d['sizeBytes'], 'sizeBytes'),
        mountPoint: string(d['mountPoint'], 'mountPoint'),
        ...(loopDevice === undefined ? {} : { loopDevice }),
      };
    }),
    processes: array(record['processes'], 'processes').map((item) => {
      const p = object(item, 'process');
      return {
        label: string(p['label'], 'label'),
        pid: number(p['pid'], 'pid'),
        cmdline: array(p['cmdline'], 'cmdline').map((arg) => string(arg, 'cmdline')),
        startedAt: string(p['startedAt'], 'startedAt'),
      };
    }),
    vms: array(record['vms'], 'vms').map((item) => {
      const v = object(item, 'vm');
      const datastore = string(v['datastore'], 'vm.datastore');
      if (!isDatastoreKind(datastore)) throw new Error(`unknown datastore ${datastore}`);
      return {
        name: string(v['name'], 'vm.name'),
        datastore,
        diskPath: string(v['diskPath'], 'vm.diskPath'),
        sizeBytes: number(v['sizeBytes'], 'vm.sizeBytes'),
        fillBytes: number(v['fillBytes'], 'vm.fillBytes'),
        createdAt: string(v['createdAt'], 'vm.createdAt'),
      };
    }),
    ...(record['zfs'] === undefined ? {} : { zfs: parseZfsRecord(record['zfs']) }),
  };
}

function parseZfsRecord(value: unknown): ZfsRecord {
  const z = object(value, 'zfs');
  return {
    poolName: string(z['poolName'], 'zfs.poolName'),
    imagePath: string(z['imagePath'], 'zfs.imagePath'),
    sizeBytes: number(z['sizeBytes'], 'zfs.sizeBytes'),
    mountPoint: string(z['mountPoint'], 'zfs.mountPoint'),
    dataset: string(z['dataset'], 'zfs.dataset'),
  };
}

function object(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new Error(`${what} is not an object`);
  return value as Record<string, unknown>;
}
function array(value: unknown, what: string): unknown[] {
  if (!Array.isArray(value)) throw new Error(`${what} is not a list`);
  return value;
}
function string(value: unknown, what: string): string {
  if (typeof value !== 'string') throw new Error(`${what} is not a string`);
  return value;
}
function number(value: unknown, what: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) throw new Error(`${what} is not a number`);
  return value;
}

/**
 * Runs `fn` holding `<state file>.lock`, so two snapshift processes changing one lab (say two
 * `lab vm start` at once) cannot lose each other's records. The lock file holds the holder's PID; a lock
 * whose holder is gone (crashed) is taken over.
 */
export async function withStateLock<T>(stateFile: string, fn: () => Promise<T>, timeoutMs = 30_000): Promise<T> {
  const lockFile = `${stateFile}.lock`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const handle = await fs.open(lockFile, 'wx');
      await handle.writeFile(String(process.pid));
      await handle.close();
      break;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      const holder = Number(await fs.readFile(lockFile, 'utf8').catch(() => ''));
      if (holder > 0 && !processIsAlive(holder)) {
        await fs.rm(lockFile, { force: true });
        continue;
      }
      if (Date.now() >= deadline) throw new SnapshiftError('LAB_LOCKED', `the lab state ${stateFile} is locked by process ${holder || '?'} for over ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
  try {
    return await fn();
  } finally {
    await fs.rm(lockFile, { force: true });
  }
}
