import { snapshiftProcessIsAlive } from '../core/process-alive.ts';
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { SnapshiftError } from '../core/errors.ts';
import type { StorageBackend } from './backend/storage-backend.ts';

export type LockKind = 'shared' | 'exclusive';

export interface LockRecord {
  kind: LockKind;
  host: string;
  pid: number;
  purpose: string;
  createdAt: string;
  refreshedAt: string;
}

const staleAfterMs = 30 * 60 * 1000;
const refreshEveryMs = 5 * 60 * 1000;

/** A held repository lock (docs/FORMAT.md § Locks); released when disposed. */
export class RepositoryLock implements AsyncDisposable {
  #timer: NodeJS.Timeout | undefined;
  #released = false;

  private constructor(
    readonly backend: StorageBackend,
    readonly name: string,
    readonly record: LockRecord,
  ) {}

  /** Takes a lock or throws REPO_LOCKED naming the holder. Stale locks found on the way are removed. */
  static async acquire(backend: StorageBackend, kind: LockKind, purpose: string): Promise<RepositoryLock> {
    const now = new Date().toISOString();
    const record: LockRecord = { kind, host: hostname(), pid: process.pid, purpose, createdAt: now, refreshedAt: now };
    const name = `locks/${randomBytes(16).toString('hex')}.json`;
    await backend.put(name, Buffer.from(JSON.stringify(record)));
    const lock = new RepositoryLock(backend, name, record);
    try {
      const conflict = await findConflict(backend, name, kind, true);
      if (conflict) throw lockedError(backend, conflict);
    } catch (error) {
      await lock.release();
      throw error;
    }
    lock.#timer = setInterval(() => void lock.#refresh(), refreshEveryMs);
    lock.#timer.unref();
    return lock;
  }

  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    clearInterval(this.#timer);
    await this.backend.delete(this.name);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }

  async #refresh(): Promise<void> {
    if (this.#released) return;
    this.record.refreshedAt = new Date().toISOString();
    await this.backend.put(this.name, Buffer.from(JSON.stringify(this.record))).catch(() => undefined);
  }
}

/** Every lock file, with whether it is stale. */
export async function listLocks(backend: StorageBackend): Promise<Array<{ name: string; record: LockRecord | undefined; stale: boolean }>> {
  const result = [];
  for (const entry of await backend.list('locks')) {
    let record: LockRecord | undefined;
    try {
      record = JSON.parse((await backend.get(entry.name)).toString('utf8')) as LockRecord;
    } catch {
      record = undefined; // vanished or half-written by a crashed process
    }
    result.push({ name: entry.name, record, stale: record ? isStale(record) : Date.now() - entry.modifiedMs > staleAfterMs });
  }
  return result;
}

function isStale(record: LockRecord): boolean {
  if (record.host === hostname()) {
    return !snapshiftProcessIsAlive(record.pid);
  }
  return Date.now() - Date.parse(record.refreshedAt) > staleAfterMs;
}

/**
 * For a reader that cannot write a lock (a read-only repository): throws REPO_LOCKED if a live lock conflicts
 * with `kind`, without removing stale ones (it cannot).
 */
export async function assertNotLocked(backend: StorageBackend, kind: LockKind): Promise<void> {
  const conflict = await findConflict(backend, undefined, kind, false);
  if (conflict) throw lockedError(backend, conflict);
}

function lockedError(backend: StorageBackend, holder: LockRecord): SnapshiftError {
  return new SnapshiftError('REPO_LOCKED', `repository ${backend.location} is locked (${holder.kind}, ${holder.purpose}) by host ${holder.host} pid ${holder.pid} since ${holder.createdAt}; try again when it is done`);
}

async function findConflict(backend: StorageBackend, own: string | undefined, kind: LockKind, removeStale: boolean): Promise<LockRecord | undefined> {
  for (const lock of await listLocks(backend)) {
    if (lock.name === own) continue;
    if (lock.stale) {
      if (removeStale) await backend.delete(lock.name);
      continue;
    }
    if (!lock.record) continue;
    if (kind === 'exclusive' || lock.record.kind === 'exclusive') return lock.record;
  }
  return undefined;
}
