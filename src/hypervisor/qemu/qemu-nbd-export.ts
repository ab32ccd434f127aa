import { rm } from 'node:fs/promises';
import { SnapshiftError } from '../../core/errors.ts';
import type { DiskExport } from '../hypervisor.ts';
import type { QmpSession } from './qmp-session.ts';
import { isSocket } from '../../core/fs-probe.ts';

export interface ExportOptions {
  /** Unix socket for the NBD server we start in the QEMU process if it runs none. */
  socketPath: string;
  /** The socket of an NBD server the process already runs (qemu-storage-daemon's --nbd-server). */
  existingServerSocketPath?: string | null;
  exportName: string;
  /** QMP id of the export; default `<exportName>-export`. */
  exportId?: string;
  /**
   * Dirty bitmaps to expose as `qemu:dirty-bitmap:NAME` meta contexts. A bare name is looked up on the
   * exported node and its backing chain only; a bitmap of another node (the disk under a fleecing node)
   * must be named with its node (QMP reference, BlockDirtyBitmapOrStr).
   */
  bitmaps?: Array<string | { node: string; name: string }>;
}

/**
 * Exports `nodeName` read-only over NBD from the QEMU process itself: `nbd-server-start` on a unix socket
 * (unless the process already serves NBD), then `block-export-add`. Disposing deletes the export and waits for
 * BLOCK_EXPORT_DELETED. Exports through one QMP session share the server we start, which stops with the last
 * of them: QEMU's `nbd-server-stop` closes every NBD export of the process, so the first export's disposal
 * must not stop it (test/hypervisor/qemu-nbd-export.test.ts).
 */
export async function exportNodeReadOnly(qmp: QmpSession, nodeName: string, options: ExportOptions): Promise<DiskExport> {
  const server = await useNbdServer(qmp, options.socketPath, options.existingServerSocketPath);
  const exportId = options.exportId ?? `${options.exportName}-export`;
  try {
    await qmp.execute('block-export-add', {
      type: 'nbd',
      id: exportId,
      'node-name': nodeName,
      name: options.exportName,
      writable: false,
      ...(options.bitmaps && options.bitmaps.length > 0 ? { bitmaps: options.bitmaps } : {}),
    });
  } catch (error) {
    await server.release();
    throw error;
  }
  let disposed: Promise<void> | undefined;
  return {
    socketPath: server.socketPath,
    exportName: options.exportName,
    [Symbol.asyncDispose]() {
      disposed ??= (async () => {
        try {
          const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => event.data?.id === exportId, { timeoutMs: 30_000 });
          deleted.catch(() => undefined);
          await qmp.execute('block-export-del', { id: exportId, mode: 'hard' });
          await deleted;
        } finally {
          await server.release();
        }
      })();
      return disposed;
    },
  };
}

/** The NBD server a QMP session's exports use, and how many of them use it now. */
interface SharedNbdServer {
  ready: Promise<{ socketPath: string; ours: boolean }>;
  users: number;
}

const sharedServers = new WeakMap<QmpSession, SharedNbdServer>();
/** A server stop in flight: a new first export waits for it, or its start would be refused ("already running"). */
const pendingStops = new WeakMap<QmpSession, Promise<void>>();

/** One use of the session's NBD server; `release` stops a server we started once nobody uses it. */
async function useNbdServer(qmp: QmpSession, socketPath: string, existingServerSocketPath: string | null | undefined): Promise<{ socketPath: string; release: () => Promise<void> }> {
  let shared = sharedServers.get(qmp);
  if (!shared) {
    const created: SharedNbdServer = { users: 0, ready: startOrFindServer(qmp, socketPath, existingServerSocketPath) };
    created.ready.catch(() => {
      if (sharedServers.get(qmp) === created) sharedServers.delete(qmp);
    });
    sharedServers.set(qmp, created);
    shared = created;
  }
  const inUse = shared;
  inUse.users++;
  let server: { socketPath: string; ours: boolean };
  try {
    server = await inUse.ready;
  } catch (error) {
    inUse.users--;
    throw error;
  }
  let released = false;
  return {
    socketPath: server.socketPath,
    release: async () => {
      if (released) return;
      released = true;
      if (--inUse.users > 0) return;
      if (sharedServers.get(qmp) === inUse) sharedServers.delete(qmp);
      if (!server.ours) return;
      const stop = stopServerIfUnused(qmp, server.socketPath);
      pendingStops.set(qmp, stop.catch(() => undefined));
      await stop;
    },
  };
}

async function startOrFindServer(qmp: QmpSession, socketPath: string, existingServerSocketPath: string | null | undefined): Promise<{ socketPath: string; ours: boolean }> {
  await pendingStops.get(qmp);
  try {
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } });
    return { socketPath, ours: true };
  } catch (error) {
    if (!/already running/i.test((error as Error).message)) throw error;
    if (existingServerSocketPath) return { socketPath: existingServerSocketPath, ours: false };
    // Our own server, left running by a task that was killed: reuse it, and stop it when done.
    if (await isSocket(socketPath)) return { socketPath, ours: true };
    throw new SnapshiftError(
      'NBD_SERVER_BUSY',
      'the QEMU process already runs an NBD server whose socket we do not know: add the host with --nbd-socket PATH',
      { cause: error },
    );
  }
}

/** Stops our server unless QEMU still lists an NBD export (another task's, or one a killed task left for the hunter). */
async function stopServerIfUnused(qmp: QmpSession, socketPath: string): Promise<void> {
  const exports = await qmp.execute<Array<{ type: string; 'shutting-down': boolean }>>('query-block-exports');
  if (exports.some((entry) => entry.type === 'nbd' && !entry['shutting-down'])) return;
  await qmp.execute('nbd-server-stop');
  await rm(socketPath, { force: true });
}

/**
 * Deletes the NBD exports a killed task of ours left in a QEMU process (ids `snapshift-<tag>-…`): they hold
 * the base node and would block the commit of the overlay above it. Exports of tags `isLive` names belong to
 * a running task and stay.
 */
export async function removeLeftoverExports(qmp: QmpSession, isLive: (tag: string) => boolean = () => false): Promise<string[]> {
  const exports = await qmp.execute<Array<{ id: string }>>('query-block-exports');
  const ours = exports.map((entry) => entry.id).filter((id) => {
    const tag = /^snapshift-([0-9a-f]{8})-/.exec(id)?.[1];
    return tag !== undefined && !isLive(tag);
  });
  for (const id of ours) {
    const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => event.data?.id === id, { timeoutMs: 30_000 });
    deleted.catch(() => undefined);
    await qmp.execute('block-export-del', { id, mode: 'hard' });
    await deleted;
  }
  return ours;
}
