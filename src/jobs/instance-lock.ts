import { processIsAlive } from '../core/process-alive.ts';
import { openSync, readFileSync, rmSync, writeSync, closeSync } from 'node:fs';
import { hostname } from 'node:os';
import { SnapshiftError } from '../core/errors.ts';

/**
 * One daemon per catalog: a lock file created exclusively, holding the holder's host and PID. A lock whose
 * holder on this host is gone is stale and taken over.
 */
export class InstanceLock implements Disposable {
  private constructor(private readonly path: string) {}

  static acquire(path: string): InstanceLock {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fd = openSync(path, 'wx', 0o600);
        writeSync(fd, JSON.stringify({ host: hostname(), pid: process.pid, startedAt: new Date().toISOString() }));
        closeSync(fd);
        return new InstanceLock(path);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
        const holder = readHolder(path);
        if (holder && holder.host === hostname() && !processIsAlive(holder.pid)) {
          rmSync(path, { force: true });
          continue;
        }
        throw new SnapshiftError('DAEMON_RUNNING', `another snapshift daemon runs for this catalog (${holder ? `${holder.host} pid ${holder.pid}` : path}); stop it first`);
      }
    }
    throw new SnapshiftError('DAEMON_RUNNING', `cannot take ${path}`);
  }

  [Symbol.dispose](): void {
    rmSync(this.path, { force: true });
  }
}

function readHolder(path: string): { host: string; pid: number } | undefined {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as { host: string; pid: number };
  } catch {
    return undefined;
  }
}

