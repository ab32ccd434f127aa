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
 * (unless the process already serves NBD), then `block-export-add`. Disposing deletes the export, waits for
 * BLOCK_EXPORT_DELETED and stops the server if we started it.
 */
export async function exportNodeReadOnly(qmp: QmpSession, nodeName: string, options: ExportOptions): Promise<DiskExport> {
  let socketPath = options.socketPath;
  let startedServer = false;
  try {
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } });
    startedServer = true;
  } catch (error) {
    if (!/already running/i.test((error as Error).message)) throw error;
    if (!options.existingServerSocketPath && (await isSocket(socketPath))) {
      // Our own server, left running by a task that was killed: reuse it, and stop it when done.
      startedServer = true;
    } else if (!options.existingServerSocketPath) {
      throw new SnapshiftError(
        'NBD_SERVER_BUSY',
        'the QEMU process already runs an NBD server whose socket we do not know: add the host with --nbd-socket PATH',
        { cause: error },
      );
    } else {
      socketPath = options.existingServerSocketPath;
    }
  }
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
    if (startedServer) await stopServer(qmp, socketPath);
    throw error;
  }
  return {
    socketPath,
    exportName: options.exportName,
    async [Symbol.asyncDispose]() {
      const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => event.data?.id === exportId, { timeoutMs: 30_000 });
      deleted.catch(() => undefined);
      await qmp.execute('block-export-del', { id: exportId, mode: 'hard' });
      await deleted;
      if (startedServer) await stopServer(qmp, socketPath);
    },
  };
}

async function stopServer(qmp: QmpSession, socketPath: string): Promise<void> {
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
