import { createHash, randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { snapshiftProcessIsAlive } from '../core/process-alive.ts';
import type { StorageBackend } from './backend/storage-backend.ts';

/**
 * Temp files carry their writer (docs/FORMAT.md § Files): `tmp/<host>-<pid>-<random>.tmp`, `host` the first 8
 * hex digits of sha256(hostname). So the next backup on the same host can remove what a killed process left at
 * once, instead of waiting out gc's safety window; files of other hosts (a shared repository) wait for gc.
 */
const hostTag = createHash('sha256').update(hostname()).digest('hex').slice(0, 8);
const ownedName = /^([0-9a-f]{8})-(\d+)-[0-9a-f]+\.tmp$/;

/** A fresh temp file name (without the folder) owned by this process. */
export function ownTempFileName(): string {
  return `${hostTag}-${process.pid}-${randomBytes(8).toString('hex')}.tmp`;
}

/** Whether a temp file's writer is known to be gone: written on this host by a process that no longer runs. */
export function tempFileOwnerIsGone(name: string): boolean {
  const owner = ownedName.exec(name.split('/').at(-1)!);
  return owner !== null && owner[1] === hostTag && !snapshiftProcessIsAlive(Number(owner[2]));
}

/** Whether a temp file belongs to a writer on this host that still runs (work in progress). */
export function tempFileOwnerIsLive(name: string): boolean {
  const owner = ownedName.exec(name.split('/').at(-1)!);
  return owner !== null && owner[1] === hostTag && snapshiftProcessIsAlive(Number(owner[2]));
}

/** Deletes the temp files of writers on this host that are gone; returns how many. Never throws for one file. */
export async function removeDeadTempFiles(backend: StorageBackend): Promise<number> {
  let removed = 0;
  for (const entry of await backend.list('tmp')) {
    if (!tempFileOwnerIsGone(entry.name)) continue;
    try {
      await backend.delete(entry.name);
      removed++;
    } catch {
      // vanished meanwhile, or not ours to delete after all: gc's safety window still covers it
    }
  }
  return removed;
}
