import { mkdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { exec, start } from '../../core/exec.ts';
import { faultPoint } from '../../core/fault-points.ts';
import { NbdServer } from '../../datamover/nbd/index.ts';
import type { RestorePointReader } from '../../repository/index.ts';
import { RestorePointExport } from '../restore-point-export.ts';
import { diskBytesOf } from './disk-bytes.ts';
import type { MountableKind } from './filesystem-probe.ts';
import { sleep } from './host-pieces.ts';
import { RunFolder } from './run-state.ts';
import { tearDownRunFolder } from './tear-down.ts';
import { findVolumes, type Volume } from './volumes.ts';

export interface FileRestoreSessionOptions {
  reader: RestorePointReader;
  /** `<home>/run`: the session's folder is made there at the first mount. */
  runRoot: string;
  onWarning?: (message: string) => void;
  /** Who holds the repository lock, as gc names it. */
  lockPurpose: string;
}

/**
 * Read-only mount options per filesystem: never replay a journal or log (that would write to the device, and
 * the loop device is read-only anyway, so the mount would fail), never honour the guest's setuid bits or
 * device nodes on the host. XFS: `nouuid`, so a copy of a filesystem the host (or another run) has mounted
 * still mounts. btrfs: `rescue=nologreplay` (plain `nologreplay` is gone from recent kernels: refused on
 * 6.18), and the top-level subvolume (id 5) so every subvolume shows as a folder.
 */
const mountOptions: Record<MountableKind, { type: string; options: string }> = {
  ext2: { type: 'ext4', options: 'noload' },
  ext3: { type: 'ext4', options: 'noload' },
  ext4: { type: 'ext4', options: 'noload' },
  xfs: { type: 'xfs', options: 'norecovery,nouuid' },
  btrfs: { type: 'btrfs', options: 'rescue=nologreplay,subvolid=5' },
};
const commonMountOptions = 'ro,nosuid,nodev,noexec';
const nbdfuseReadyTimeoutMs = 30_000;

/**
 * A restore point's disks, open for file-level restore. Opening reads partition tables and superblocks
 * straight from the restore point (no mount). The first mount starts the rest, each piece recorded in the run
 * folder's state file before it starts: our NBD server on a socket in the run folder, one nbdfuse per disk
 * (the disk as a file), one read-only loop device per volume over that file, one read-only mount. Disposing
 * undoes all of it, whatever failed (the same `tearDownRunFolder` a later run uses on a killed one's folder).
 */
export class FileRestoreSession implements AsyncDisposable {
  readonly volumes: Volume[];
  readonly #options: FileRestoreSessionOptions;
  readonly #exports: RestorePointExport[];
  readonly #roots = new Map<string, Promise<string>>();
  readonly #nbdfuse = new Map<string, Promise<string>>();
  #runFolder: Promise<RunFolder> | undefined;
  #server: NbdServer | undefined;
  #closed = false;

  private constructor(options: FileRestoreSessionOptions, exports: RestorePointExport[], volumes: Volume[]) {
    this.#options = options;
    this.#exports = exports;
    this.volumes = volumes;
  }

  static async open(options: FileRestoreSessionOptions): Promise<FileRestoreSession> {
    const exports: RestorePointExport[] = [];
    try {
      for (const disk of options.reader.summary.disks) {
        exports.push(await RestorePointExport.open(options.reader, disk.name, { onWarning: options.onWarning, lockPurpose: options.lockPurpose }));
      }
      // By name (vda before vdb, disk2 before disk10), not in the hypervisor's order: how people look for them.
      const byName = [...exports].sort((a, b) => a.name.localeCompare(b.name, 'en', { numeric: true }));
      const volumes = await findVolumes(byName.map((source) => ({ name: source.name, sizeBytes: source.sizeBytes, read: diskBytesOf(source) })));
      return new FileRestoreSession(options, exports, volumes);
    } catch (error) {
      for (const source of exports) await source.close();
      throw error;
    }
  }

  /** Where `volume`'s filesystem is mounted read-only on the host, mounting it at the first call. */
  async mountedRoot(volume: Volume): Promise<string> {
    if (this.#closed) throw new SnapshiftError('FILES_STOPPED', 'the file-level restore session is closed');
    if (volume.filesystem.kind === 'unsupported') {
      throw new SnapshiftError(
        'FILES_FILESYSTEM_UNSUPPORTED',
        `/${volume.name} holds ${volume.filesystem.what}: files can be restored from ext2/3/4, XFS and btrfs only`,
      );
    }
    let root = this.#roots.get(volume.name);
    if (!root) {
      root = this.#mount(volume);
      this.#roots.set(volume.name, root);
    }
    return await root;
  }

  async #mount(volume: Volume): Promise<string> {
    const kind = volume.filesystem.kind as MountableKind;
    if (process.getuid?.() !== 0) {
      throw new SnapshiftError('FILES_MOUNT_FAILED', `/${volume.name} cannot be mounted: file-level restore attaches loop devices and mounts filesystems, which needs root`);
    }
    const folder = await this.#folder();
    const diskFile = await this.#diskFile(volume.disk);
    const { stdout } = await exec(
      'losetup',
      ['--read-only', '--find', '--show', '--offset', String(volume.startBytes), '--sizelimit', String(volume.sizeBytes), diskFile],
      { code: 'FILES_MOUNT_FAILED', timeoutMs: 60_000 },
    );
    const device = stdout.trim();
    folder.state.loops.push({ volume: volume.name, device });
    await folder.save();
    const mountPoint = join(folder.path, 'mnt', String(this.volumes.indexOf(volume)));
    await mkdir(mountPoint, { recursive: true, mode: 0o700 });
    folder.state.mounts.push({ volume: volume.name, mountPoint });
    await folder.save();
    const { type, options } = mountOptions[kind];
    try {
      await exec('mount', ['-t', type, '-o', `${commonMountOptions},${options}`, device, mountPoint], { code: 'FILES_MOUNT_FAILED', timeoutMs: 300_000 });
    } catch (error) {
      throw new SnapshiftError('FILES_MOUNT_FAILED', `/${volume.name} (${kind}) cannot be mounted read-only: ${messageOf(error)}`, { cause: error });
    }
    faultPoint('files.after-mount');
    return mountPoint;
  }

  #folder(): Promise<RunFolder> {
    this.#runFolder ??= (async () => {
      const summary = this.#options.reader.summary;
      const folder = await RunFolder.create(this.#options.runRoot, summary.vmName, summary.id);
      try {
        this.#server = await NbdServer.listen({
          exports: this.#exports,
          socketPath: join(folder.path, 'nbd.sock'),
          onError: (message) => this.#options.onWarning?.(`NBD server: ${message}`),
        });
      } catch (error) {
        await tearDownRunFolder(folder.path, folder.state);
        throw error;
      }
      return folder;
    })();
    return this.#runFolder;
  }

  /** The disk as a read-only file, served by an nbdfuse child reading our NBD server. */
  #diskFile(disk: string): Promise<string> {
    let file = this.#nbdfuse.get(disk);
    if (!file) {
      file = this.#startNbdfuse(disk);
      this.#nbdfuse.set(disk, file);
    }
    return file;
  }

  async #startNbdfuse(disk: string): Promise<string> {
    const folder = await this.#folder();
    const index = this.#exports.findIndex((source) => source.name === disk);
    const mountPoint = join(folder.path, `disk-${index}`);
    const pidFile = join(folder.path, `disk-${index}.pid`);
    await mkdir(mountPoint, { mode: 0o700 });
    const record: RunFolder['state']['nbdfuse'][number] = { disk, mountPoint, pid: null };
    folder.state.nbdfuse.push(record);
    await folder.save();
    // Its own process group (a Ctrl-C in the terminal is ours to handle, not nbdfuse's: it must outlive the
    // unmounts), and killed by the kernel if we die; -r: read-only, our server refuses writes anyway.
    const child = start('setpriv', ['--pdeathsig', 'KILL', '--', 'nbdfuse', '--readonly', '--pidfile', pidFile, `${mountPoint}/disk`, this.#server!.uriOf(disk)], {
      detached: true,
    });
    record.pid = child.pid ?? null;
    await folder.save();
    let stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.stdout?.resume();
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    const spawnFailed = new Promise<Error>((resolve) => child.once('error', resolve));
    const deadline = Date.now() + nbdfuseReadyTimeoutMs;
    for (;;) {
      if (existsSync(pidFile)) return `${mountPoint}/disk`;
      const outcome = await Promise.race([exited.then(() => 'exited' as const), spawnFailed, sleep(20).then(() => 'waiting' as const)]);
      if (outcome instanceof Error) throw new SnapshiftError('PROGRAM_MISSING', `nbdfuse cannot be started (${outcome.message}); install libnbd-bin (bash scripts/setup.sh)`);
      if (outcome === 'exited') {
        const reason = stderr.trim().split('\n').at(-1) || `exit status ${child.exitCode ?? child.signalCode}`;
        const missing = /No such file|not found/i.test(reason) && reason.includes('nbdfuse');
        throw new SnapshiftError(missing ? 'PROGRAM_MISSING' : 'FILES_MOUNT_FAILED', `nbdfuse could not present disk ${disk} as a file: ${reason}${missing ? ' (install libnbd-bin: bash scripts/setup.sh)' : ''}`);
      }
      if (Date.now() > deadline) throw new SnapshiftError('FILES_MOUNT_FAILED', `nbdfuse did not present disk ${disk} within ${nbdfuseReadyTimeoutMs} ms`);
    }
  }

  /** Unmounts, detaches and ends everything, then closes the server and the exports; FILES_CLEANUP_FAILED names what stays. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const problems: string[] = [];
    let folder: RunFolder | undefined;
    try {
      folder = await this.#runFolder;
    } catch {
      // Creating the folder or starting the server failed; anything made before that is still torn down below.
    }
    // Mounts still being made finish first, so that none appears after the tear-down looked.
    await Promise.allSettled([...this.#roots.values(), ...this.#nbdfuse.values()]);
    if (folder) problems.push(...(await tearDownRunFolder(folder.path, folder.state, { removeFolder: false })).problems);
    await this.#server?.close();
    if (folder && problems.length === 0) problems.push(...(await tearDownRunFolder(folder.path, folder.state)).problems);
    for (const source of this.#exports) await source.close();
    if (problems.length > 0) {
      throw new SnapshiftError('FILES_CLEANUP_FAILED', `file-level restore could not undo everything (the next "snapshift files" or "snapshift hunt" retries): ${problems.join('; ')}`);
    }
  }
}
