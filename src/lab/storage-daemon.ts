import { once } from 'node:events';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { start } from '../core/exec.ts';
import { SnapshiftError } from '../core/errors.ts';
import { QmpClient } from '../hypervisor/qemu/qmp-client.ts';

export interface StorageDaemonImage {
  /** The image file (required unless `rbd` is given). */
  path?: string;
  /** An RBD image instead of a file, opened by QEMU's rbd driver (no kernel rbd needed); its disk path is `rbd:pool/image`. */
  rbd?: { pool: string; image: string; conf: string };
  format: 'qcow2' | 'raw';
  /** Format node name; default `disk<i>`. Its protocol (file) node is `<nodeName>-file`. */
  nodeName?: string;
  /** NBD export name of the writable export; default the node name. */
  exportName?: string;
  /** Data reads of the image fail with EIO (a blkdebug filter under the format node): an unreadable disk. */
  failReads?: boolean;
}

export interface StorageDaemonOptions {
  /** Directory for the sockets (must exist; unix socket paths must stay under ~107 bytes). */
  dir: string;
  images: StorageDaemonImage[];
  /** How long to wait for the daemon to come up; default 10 s. */
  readyTimeoutMs?: number;
  /**
   * Run no NBD server (and so no writable exports), as a VM runs none until the engine starts one with
   * `nbd-server-start`; default false.
   */
  noNbdServer?: boolean;
}

/** One image as the daemon serves it. */
export interface StorageDaemonDisk {
  /** The image file, or `rbd:pool/image`. */
  path: string;
  format: 'qcow2' | 'raw';
  nodeName: string;
  fileNodeName: string;
  exportName: string;
  /** QMP id of the writable export (`block-export-del` takes it). */
  exportId: string;
}

/**
 * A guest-less disk for tests: qemu-storage-daemon holding images, with a writable NBD export per image
 * (the "guest" writes through it with our NBD client) and QMP, where snapshots, commits and dirty bitmaps
 * behave as in a VM.
 *
 * The daemon runs its NBD server from the command line (`--nbd-server`), so an engine on `qmpSocketPath`
 * must not call `nbd-server-start`: QEMU refuses a second server with GenericError "NBD server already
 * running", and no QMP command of QEMU 7.2 reports the running server's address (query-block-exports
 * lists exports, not the server). The engine therefore learns `nbdSocketPath` out of band (the host's
 * configuration) and adds its read-only exports with `block-export-add` on this same server.
 *
 * Two QMP monitors: `qmpSocketPath` is for the engine under test, and a private one is for this class
 * (stop), because a QMP socket serves one client at a time.
 */
export class StorageDaemon implements AsyncDisposable {
  readonly #child: ChildProcess;
  readonly #labQmpSocketPath: string;
  readonly #exited: Promise<void>;
  #stderrTail = '';
  /** PID of qemu-storage-daemon. */
  readonly pid: number;
  /** QMP socket for the engine (or a test) to use. */
  readonly qmpSocketPath: string;
  /** The daemon's NBD server; every image's writable export and any export added later live here (absent with `noNbdServer`). */
  readonly nbdSocketPath: string;
  readonly disks: readonly StorageDaemonDisk[];

  private constructor(child: ChildProcess, dir: string, disks: StorageDaemonDisk[]) {
    this.#child = child;
    this.pid = child.pid!;
    this.qmpSocketPath = join(dir, 'qmp.sock');
    this.#labQmpSocketPath = join(dir, 'lab-qmp.sock');
    this.nbdSocketPath = join(dir, 'nbd.sock');
    this.disks = disks;
    this.#exited = child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : once(child, 'exit').then(() => undefined);
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (text: string) => {
      this.#stderrTail = (this.#stderrTail + text).slice(-4096);
    });
  }

  /** Starts qemu-storage-daemon and resolves once its QMP and NBD sockets accept connections. */
  static async start(options: StorageDaemonOptions): Promise<StorageDaemon> {
    if (options.images.length === 0) throw new SnapshiftError('BAD_ARGUMENT', 'a storage daemon needs at least one image');
    const disks = options.images.map((image, index): StorageDaemonDisk => {
      const nodeName = image.nodeName ?? `disk${index}`;
      const path = image.rbd ? `rbd:${image.rbd.pool}/${image.rbd.image}` : image.path;
      if (path === undefined) throw new SnapshiftError('BAD_ARGUMENT', `storage daemon image ${index} needs a path or an rbd image`);
      return { path, format: image.format, nodeName, fileNodeName: `${nodeName}-file`, exportName: image.exportName ?? nodeName, exportId: `${nodeName}-export` };
    });
    const dir = options.dir;
    for (const name of ['qmp.sock', 'lab-qmp.sock', 'nbd.sock']) await rm(join(dir, name), { force: true });
    const args: string[] = [];
    for (const [index, disk] of disks.entries()) {
      const image = options.images[index]!;
      const rbd = image.rbd;
      if (rbd) args.push('--blockdev', JSON.stringify({ driver: 'rbd', 'node-name': disk.fileNodeName, pool: rbd.pool, image: rbd.image, conf: rbd.conf }));
      else args.push('--blockdev', `driver=file,node-name=${disk.fileNodeName},filename=${escapeOption(disk.path)}`);
      let child = disk.fileNodeName;
      if (image.failReads) {
        child = `${disk.nodeName}-faulty`;
        args.push('--blockdev', `driver=blkdebug,node-name=${child},image=${disk.fileNodeName},inject-error.0.event=read_aio,inject-error.0.errno=5`);
      }
      args.push('--blockdev', `driver=${disk.format},node-name=${disk.nodeName},file=${child}`);
    }
    if (!options.noNbdServer) {
      args.push('--nbd-server', `addr.type=unix,addr.path=${escapeOption(join(dir, 'nbd.sock'))}`);
      for (const disk of disks) {
        args.push('--export', `type=nbd,id=${disk.exportId},node-name=${disk.nodeName},name=${escapeOption(disk.exportName)},writable=on`);
      }
    }
    // Monitors last: qemu-storage-daemon processes options in order, so once QMP answers, all is set up.
    args.push('--chardev', `socket,id=qmp-engine,path=${escapeOption(join(dir, 'qmp.sock'))},server=on,wait=off`, '--monitor', 'chardev=qmp-engine');
    args.push('--chardev', `socket,id=qmp-lab,path=${escapeOption(join(dir, 'lab-qmp.sock'))},server=on,wait=off`, '--monitor', 'chardev=qmp-lab');

    const child = start('qemu-storage-daemon', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    if (child.pid === undefined) {
      const [error] = (await once(child, 'error')) as [Error];
      throw new SnapshiftError('PROGRAM_MISSING', `cannot start qemu-storage-daemon (${error.message}); install qemu-utils (bash scripts/setup.sh)`, { cause: error });
    }
    const daemon = new StorageDaemon(child, dir, disks);
    try {
      await daemon.#waitReady(options.readyTimeoutMs ?? 10_000);
    } catch (error) {
      await daemon.kill();
      throw error;
    }
    return daemon;
  }

  /** True while the process runs. */
  get running(): boolean {
    return this.#child.exitCode === null && this.#child.signalCode === null;
  }

  /** The disk whose node name or export name is `name`. */
  disk(name: string): StorageDaemonDisk {
    const disk = this.disks.find((candidate) => candidate.nodeName === name || candidate.exportName === name);
    if (!disk) throw new SnapshiftError('BAD_ARGUMENT', `storage daemon ${this.pid} has no disk ${name}`);
    return disk;
  }

  /** Ends the daemon cleanly (QMP quit flushes images and stores persistent bitmaps); SIGKILL after `timeoutMs`. */
  async stop(timeoutMs = 10_000): Promise<void> {
    if (this.running) {
      try {
        await using qmp = await QmpClient.connect(this.#labQmpSocketPath, { timeoutMs: Math.min(timeoutMs, 5_000) });
        await qmp.execute('quit', undefined, { timeoutMs }).catch((error: unknown) => {
          // QEMU may close the socket before the reply arrives; that still is a quit.
          if (!(error instanceof SnapshiftError && error.code === 'QMP_DISCONNECTED')) throw error;
        });
      } catch {
        // No clean way in: fall through to the deadline and SIGKILL.
      }
      const deadline = new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), timeoutMs).unref());
      if ((await Promise.race([this.#exited.then(() => 'exited' as const), deadline])) === 'timeout') await this.kill();
    }
    await this.#removeSockets();
  }

  /** SIGKILL by PID, as a crash would; persistent bitmaps are left "in use" (inconsistent). */
  async kill(): Promise<void> {
    if (this.running) {
      process.kill(this.pid, 'SIGKILL');
      await this.#exited;
    }
    await this.#removeSockets();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  async #waitReady(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!this.running) {
        throw new SnapshiftError('STORAGE_DAEMON_FAILED', `qemu-storage-daemon exited at start: ${this.#stderrTail.trim().split('\n').at(-1) ?? 'no message'}`);
      }
      try {
        const qmp = await QmpClient.connect(this.#labQmpSocketPath, { timeoutMs: Math.max(100, deadline - Date.now()) });
        await qmp.close();
        return;
      } catch (error) {
        if (!(error instanceof SnapshiftError && error.code === 'QMP_CONNECT_FAILED') || Date.now() > deadline) {
          throw new SnapshiftError('STORAGE_DAEMON_FAILED', `qemu-storage-daemon ${this.pid} did not come up within ${timeoutMs} ms: ${(error as Error).message}`, { cause: error });
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }

  async #removeSockets(): Promise<void> {
    await Promise.all([this.qmpSocketPath, this.#labQmpSocketPath, this.nbdSocketPath].map((path) => rm(path, { force: true })));
  }
}

/** QEMU option values escape a comma by doubling it. */
function escapeOption(value: string): string {
  return value.replaceAll(',', ',,');
}
