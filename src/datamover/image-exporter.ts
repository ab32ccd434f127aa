import { rm } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { SnapshiftError } from '../core/errors.ts';
import { start } from '../core/exec.ts';
import type { DiskExport } from '../hypervisor/hypervisor.ts';
import { isSocket } from '../core/fs-probe.ts';

export interface ImageExportOptions {
  /** A file path, or `json:{…}` protocol options as QEMU names nodes (e.g. an RBD snapshot: driver rbd, pool, image, snapshot, conf). */
  imagePath: string;
  format: string;
  /** Folder for the NBD socket. */
  runDir: string;
  exportName: string;
  readyTimeoutMs?: number;
  /**
   * Open without image locks (QEMU `force-share`), for an image a running VM holds: the frozen base under a
   * libvirt VM snapshot, which that QEMU still reads and will write when the snapshot is committed.
   */
  forceShare?: boolean;
}

/**
 * Serves one image read-only over NBD on a unix socket with a qemu-storage-daemon child of ours, for reads
 * from a storage snapshot. The daemon is ended by its PID when the export is disposed.
 */
export async function exportImageReadOnly(options: ImageExportOptions): Promise<DiskExport> {
  const socketPath = join(options.runDir, `${options.exportName}.nbd.sock`);
  await rm(socketPath, { force: true });
  const shared = options.forceShare ? { 'force-share': true } : {};
  const file = { ...protocolOptionsOf(options.imagePath), 'read-only': true, ...shared };
  const node = options.format === 'raw' ? { ...file, 'node-name': 'image' } : { driver: options.format, 'node-name': 'image', 'read-only': true, ...shared, file };
  // setpriv --pdeathsig: the kernel kills the daemon when we die, even by SIGKILL, so a crashed backup
  // never leaves a daemon holding the storage snapshot open (which would also block its removal).
  const daemon = start('setpriv', [
    '--pdeathsig',
    'KILL',
    '--',
    'qemu-storage-daemon',
    '--blockdev',
    JSON.stringify(node),
    '--nbd-server',
    `addr.type=unix,addr.path=${socketPath}`,
    '--export',
    `type=nbd,id=export,node-name=image,name=${options.exportName},writable=off`,
  ]);
  let stderr = '';
  daemon.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  daemon.stdout?.resume();
  try {
    await waitForSocket(socketPath, daemon, options.readyTimeoutMs ?? 10_000, () => stderr);
  } catch (error) {
    await stopDaemon(daemon);
    throw error;
  }
  return {
    socketPath,
    exportName: options.exportName,
    async [Symbol.asyncDispose]() {
      await stopDaemon(daemon);
      await rm(socketPath, { force: true });
    },
  };
}

/** Blockdev options of the image's protocol node: a plain path is a file; `json:{…}` carries its own driver. */
function protocolOptionsOf(imagePath: string): Record<string, unknown> {
  if (!imagePath.startsWith('json:')) return { driver: 'file', filename: imagePath };
  const options: unknown = JSON.parse(imagePath.slice('json:'.length));
  if (typeof options !== 'object' || options === null || typeof (options as { driver?: unknown }).driver !== 'string') {
    throw new SnapshiftError('IMAGE_EXPORT_FAILED', `cannot serve ${imagePath}: not a QEMU json: block node name with a driver`);
  }
  return options as Record<string, unknown>;
}

async function waitForSocket(socketPath: string, daemon: ChildProcess, timeoutMs: number, stderr: () => string): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    if (daemon.exitCode !== null) {
      throw new SnapshiftError('IMAGE_EXPORT_FAILED', `qemu-storage-daemon could not serve the image: ${stderr().trim().split('\n').at(-1) ?? `exit ${daemon.exitCode}`}`);
    }
    // QEMU binds the socket before it listens: a connect in between is refused, so only a connect proves it ready.
    if ((await isSocket(socketPath)) && (await acceptsConnections(socketPath))) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new SnapshiftError('IMAGE_EXPORT_FAILED', `qemu-storage-daemon did not open ${socketPath} within ${timeoutMs} ms`);
}

function acceptsConnections(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createConnection(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}

async function stopDaemon(daemon: ChildProcess): Promise<void> {
  if (daemon.exitCode !== null || daemon.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => daemon.once('exit', () => resolve()));
  daemon.kill('SIGTERM');
  const timer = setTimeout(() => daemon.kill('SIGKILL'), 5_000);
  await exited;
  clearTimeout(timer);
}
