import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { exec, start } from '../../core/exec.ts';
import { faultPoint } from '../../core/fault-points.ts';
import { NbdServer } from '../../datamover/nbd/index.ts';
import type { RestorePointReader } from '../../repository/index.ts';
import { RestorePointExport } from '../restore-point-export.ts';
import { diskBytesOf } from './disk-bytes.ts';
import type { MountableKind } from './filesystem-probe.ts';
import { readMounts, sleep } from './host-pieces.ts';
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
  /** Mount without replaying journals and logs (for one too damaged to replay); default: replay into the overlay. */
  noReplay?: boolean;
}

/**
 * Mount options per filesystem. By default the journal or log is replayed, as the guest's own next mount would:
 * the mount is `ro`, but the loop device is writable and the replay's writes land in the throwaway overlay, so a
 * crash-consistent restore point shows everything it holds (XFS keeps recent metadata in its log for a long
 * time: without replay, a folder created a minute before the backup is missing). `noReplay` reads what is on
 * disk outside the journal, for a journal too damaged to replay: ext `noload`, XFS `norecovery`, btrfs
 * `rescue=nologreplay` (plain `nologreplay` is refused by Linux 6.18). XFS: `nouuid`, so a copy of a filesystem
 * the host or another run has mounted still mounts. btrfs: the top-level subvolume (id 5), so every subvolume
 * shows as a folder.
 */
const mountOptions: Record<MountableKind, { type: string; replay: string; noReplay: string }> = {
  ext2: { type: 'ext4', replay: '', noReplay: 'noload' },
  ext3: { type: 'ext4', replay: '', noReplay: 'noload' },
  ext4: { type: 'ext4', replay: '', noReplay: 'noload' },
  xfs: { type: 'xfs', replay: 'nouuid', noReplay: 'norecovery,nouuid' },
  btrfs: { type: 'btrfs', replay: 'subvolid=5', noReplay: 'rescue=nologreplay,subvolid=5' },
};
/** Never write, never honour the guest's setuid bits, device nodes or executables on the host. */
const commonMountOptions = 'ro,nosuid,nodev,noexec';
const readerReadyTimeoutMs = 30_000;

/**
 * A restore point's disks, open for file-level restore. Opening reads partition tables and superblocks
 * straight from the restore point (no mount). The first mount starts the rest, each piece recorded in the run
 * folder's state file before it starts: our NBD server on a socket in the run folder, one qemu-storage-daemon
 * per disk (the disk as a file, over a throwaway overlay), one loop device per volume over that file, one
 * read-only mount. Disposing undoes all of it, whatever failed (the same `tearDownRunFolder` a later run uses on
 * a killed one's folder).
 */
export class FileRestoreSession implements AsyncDisposable {
  readonly volumes: Volume[];
  readonly #options: FileRestoreSessionOptions;
  readonly #exports: RestorePointExport[];
  readonly #roots = new Map<string, Promise<string>>();
  readonly #readers = new Map<string, Promise<string>>();
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
      // Writable: the journal replay writes through it into the overlay (the mount itself is read-only).
      ['--find', '--show', '--offset', String(volume.startBytes), '--sizelimit', String(volume.sizeBytes), diskFile],
      { code: 'FILES_MOUNT_FAILED', timeoutMs: 60_000 },
    );
    const device = stdout.trim();
    folder.state.loops.push({ volume: volume.name, device });
    await folder.save();
    const mountPoint = join(folder.path, 'mnt', String(this.volumes.indexOf(volume)));
    await mkdir(mountPoint, { recursive: true, mode: 0o700 });
    folder.state.mounts.push({ volume: volume.name, mountPoint });
    await folder.save();
    const chosen = mountOptions[kind];
    const options = [commonMountOptions, this.#options.noReplay ? chosen.noReplay : chosen.replay].filter((part) => part !== '').join(',');
    try {
      await exec('mount', ['-t', chosen.type, '-o', options, device, mountPoint], { code: 'FILES_MOUNT_FAILED', timeoutMs: 300_000 });
    } catch (error) {
      const hint = this.#options.noReplay ? '' : ' (a journal too damaged to replay? try --no-replay)';
      throw new SnapshiftError('FILES_MOUNT_FAILED', `/${volume.name} (${kind}) cannot be mounted read-only: ${messageOf(error)}${hint}`, { cause: error });
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

  /** The disk as a file: a qemu-storage-daemon child reading our NBD server under a throwaway overlay. */
  #diskFile(disk: string): Promise<string> {
    let file = this.#readers.get(disk);
    if (!file) {
      file = this.#startDiskReader(disk);
      this.#readers.set(disk, file);
    }
    return file;
  }

  /**
   * qemu-storage-daemon with three nodes: an NBD client of our server (read-only), a qcow2 overlay in the run
   * folder over it that takes the journal replay's writes, and a writable FUSE export of the overlay as a file.
   * The restore point is never written: our server refuses writes, and the overlay is deleted with the folder.
   */
  async #startDiskReader(disk: string): Promise<string> {
    const folder = await this.#folder();
    const index = this.#exports.findIndex((source) => source.name === disk);
    const source = this.#exports[index]!;
    const overlay = join(folder.path, `disk-${index}.overlay.qcow2`);
    const diskFile = join(folder.path, `disk-${index}.raw`);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', overlay, String(source.sizeBytes)], { code: 'FILES_MOUNT_FAILED', timeoutMs: 60_000 });
    await writeFile(diskFile, '', { mode: 0o600 }); // a FUSE export mounts over an existing regular file
    const record: RunFolder['state']['readers'][number] = { disk, diskFile, pid: null };
    folder.state.readers.push(record);
    await folder.save();
    const blockdevs = [
      { driver: 'nbd', 'node-name': 'restore-point', server: { type: 'unix', path: this.#server!.socketPath }, export: disk, 'read-only': true },
      { driver: 'qcow2', 'node-name': 'overlay', file: { driver: 'file', filename: overlay }, backing: 'restore-point' },
    ];
    const fuseExport = { type: 'fuse', id: 'disk', 'node-name': 'overlay', mountpoint: diskFile, writable: true };
    // Its own process group (a Ctrl-C in the terminal is ours to handle: the reader must outlive the unmounts),
    // and killed by the kernel if we die.
    const child = start(
      'setpriv',
      ['--pdeathsig', 'KILL', '--', 'qemu-storage-daemon', ...blockdevs.flatMap((node) => ['--blockdev', JSON.stringify(node)]), '--export', JSON.stringify(fuseExport)],
      { detached: true },
    );
    record.pid = child.pid ?? null;
    await folder.save();
    let stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.stdout?.resume();
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    const spawnFailed = new Promise<Error>((resolve) => child.once('error', resolve));
    const deadline = Date.now() + readerReadyTimeoutMs;
    for (;;) {
      if ((await readMounts()).some((mount) => mount.mountPoint === diskFile)) return diskFile;
      const outcome = await Promise.race([exited.then(() => 'exited' as const), spawnFailed, sleep(20).then(() => 'waiting' as const)]);
      if (outcome instanceof Error) throw new SnapshiftError('PROGRAM_MISSING', `qemu-storage-daemon cannot be started (${outcome.message}); bash scripts/setup.sh installs it`);
      if (outcome === 'exited') {
        const reason = stderr.trim().split('\n').at(-1) || `exit status ${child.exitCode ?? child.signalCode}`;
        throw new SnapshiftError('FILES_MOUNT_FAILED', `qemu-storage-daemon could not present disk ${disk} as a file: ${reason}`);
      }
      if (Date.now() > deadline) throw new SnapshiftError('FILES_MOUNT_FAILED', `qemu-storage-daemon did not present disk ${disk} within ${readerReadyTimeoutMs} ms`);
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
    await Promise.allSettled([...this.#roots.values(), ...this.#readers.values()]);
    if (folder) problems.push(...(await tearDownRunFolder(folder.path, folder.state, { removeFolder: false })).problems);
    await this.#server?.close();
    if (folder && problems.length === 0) problems.push(...(await tearDownRunFolder(folder.path, folder.state)).problems);
    for (const source of this.#exports) await source.close();
    if (problems.length > 0) {
      throw new SnapshiftError('FILES_CLEANUP_FAILED', `file-level restore could not undo everything (the next "snapshift files" or "snapshift hunt" retries): ${problems.join('; ')}`);
    }
  }
}
