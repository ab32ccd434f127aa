import { promises as fs } from 'node:fs';
import path from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import { formatByteSize } from './byte-size.ts';
import { consoleTail, parseGuestConsole, readGuestConsole } from './guest-console.ts';
import { ensureGuestInitramfs } from './guest-initramfs.ts';
import { ensureGuestKernel, type GuestKernel } from './guest-kernel.ts';
import { isMounted } from './host-inventory.ts';
import { createDatastore, removeDatastore } from './lab-datastore.ts';
import { LabLayout, datastoreKinds, defaultLabDir, isDatastoreKind, type DatastoreKind } from './lab-layout.ts';
import { checkLabHost } from './lab-preflight.ts';
import { emptyLabState, readLabState, withStateLock, writeLabState, type DatastoreRecord, type LabState, type ProcessRecord, type VmRecord } from './lab-state.ts';
import { LabVm, vmProcessLabel } from './lab-vm.ts';
import { endOwnedProcess, isOwnedProcessAlive, sleep } from './owned-process.ts';
import { chooseAccelerator, guestQemuArgs, guestRunFiles, launchGuestQemu, qemuProgram, type Accelerator } from './qemu-guest.ts';
import { createVmDisk } from './vm-disk.ts';
import { checkZfsHost, createZfsPool, endZfsDaemon, ensureZfsDaemon, minZfsPoolSizeBytes, newZfsRecord, removeZfsPool, zfsDaemonLabel, zfsPoolImported, type ZfsRecord } from './lab-zfs.ts';
import { pathExists } from '../core/fs-probe.ts';

export interface LabUpOptions {
  /** Lab folder; default ./.snapshift-lab. */
  dir?: string;
  /** Size of each datastore's sparse loop file; default 4 GiB. */
  datastoreSizeBytes?: number;
  /** Also a ZFS datastore (zfs-fuse, a pool on a sparse file); see `zfsUp`. */
  zfs?: boolean;
}

export interface ZfsUpOptions {
  /** Size of the pool's sparse file; default 4 GiB. */
  sizeBytes?: number;
}

/** The lab's ZFS datastore, for storage providers and tests. */
export interface LabZfs {
  poolName: string;
  /** `<pool>/vms`: the dataset VM disks live on. */
  dataset: string;
  mountPoint: string;
  vmDisksDir: string;
}

export interface LabDownOptions {
  /** Also remove <lab>/cache (the guest kernel). A shared SNAPSHIFT_LAB_CACHE is never removed. */
  purgeCache?: boolean;
}

export interface LabDownReport {
  dir: string;
  /** False when there was no lab state in the folder (nothing to do). */
  wasUp: boolean;
  endedPids: number[];
  removedDatastores: DatastoreKind[];
  /** The ZFS pool destroyed, if the lab had one. */
  removedZfsPool?: string;
  /** What became of the zfs-fuse daemon: ended; kept (not ours, or other pools still use it); gone already. */
  zfsDaemon?: 'ended' | 'kept' | 'gone';
}

export interface CreateVmOptions {
  datastore: DatastoreKind | string;
  sizeBytes: number;
  /** Random data at the start of the disk; the rest stays unallocated. */
  fillBytes: number;
}

export interface StartVmOptions {
  /** The guest's steady write rate; default 4 MiB/s. */
  rateMiBps?: number;
  memoryMiB?: number;
  accelerator?: Accelerator;
  /** How long the guest may take to reach its workload; default 60 s (TCG boots in ~3 s). */
  bootTimeoutMs?: number;
}

export interface LabStatus {
  dir: string;
  up: boolean;
  datastores: Array<DatastoreRecord & { mounted: boolean; vmDisksDir: string; snapshotsDir: string }>;
  vms: Array<VmRecord & { running: boolean; pid?: number; qmpSocketPath: string }>;
  /** Every recorded process (VMs and others, e.g. storage daemons) and whether it still runs. */
  processes: Array<ProcessRecord & { running: boolean }>;
  zfs?: ZfsRecord & { imported: boolean; vmDisksDir: string };
}

export const defaultDatastoreSizeBytes = 4 * 1024 ** 3;
/** XFS refuses filesystems under 300 MiB. */
const minDatastoreSizeBytes = 512 * 1024 ** 2;
const vmNamePattern = /^[a-z][a-z0-9-]{0,30}$/;

/** State-file updates of one lab, serialized within this process (read, change, write atomically). */
const updateQueues = new Map<string, Promise<unknown>>();

/**
 * The built-in lab: btrfs and XFS datastores on loop files, tiny real guests writing to qcow2 disks on them.
 * Everything it makes is recorded in <lab>/lab-state.json before it is made, so `Lab.down(dir)` removes
 * exactly that, also after the process that made it crashed.
 */
export class Lab implements AsyncDisposable {
  readonly layout: LabLayout;

  private constructor(layout: LabLayout) {
    this.layout = layout;
  }

  get dir(): string {
    return this.layout.dir;
  }

  /**
   * Brings a lab up in `dir` (or returns the one already up there). Checks the host first; if anything
   * fails half-way, removes what it made, so a failed up leaves nothing behind.
   */
  static async up(options: LabUpOptions = {}): Promise<Lab> {
    const layout = new LabLayout(options.dir ?? defaultLabDir);
    const sizeBytes = options.datastoreSizeBytes ?? defaultDatastoreSizeBytes;
    if (sizeBytes < minDatastoreSizeBytes) throw new SnapshiftError('BAD_ARGUMENT', `datastore size ${formatByteSize(sizeBytes)} is too small (at least ${formatByteSize(minDatastoreSizeBytes)}: XFS needs 300 MiB)`);
    await checkLabHost();

    const existing = await readLabState(layout.stateFile);
    // A state without datastores is a lab that holds only Ceph (`lab ceph up`): add the datastores to it.
    if (existing && existing.datastores.length > 0) {
      const lab = new Lab(layout);
      const status = await lab.status();
      if (status.up) return lab;
      throw new SnapshiftError('LAB_BROKEN', `a lab in ${layout.dir} is half up (a datastore is not mounted); run "snapshift lab down --dir ${layout.dir}" first`);
    }

    const dirExisted = await pathExists(layout.dir);
    const lab = new Lab(layout);
    try {
      await fs.mkdir(layout.dir, { recursive: true });
      if (!existing) await writeLabState(layout.stateFile, emptyLabState(layout.dir));
      for (const kind of datastoreKinds) {
        await createDatastore(layout, kind, sizeBytes, (datastore) =>
          lab.#update((state) => {
            state.datastores = [...state.datastores.filter((d) => d.kind !== kind), { ...datastore }];
          }),
        );
      }
      if (options.zfs) await lab.zfsUp({ sizeBytes });
      return lab;
    } catch (error) {
      try {
        await Lab.down(layout.dir);
        if (!dirExisted) await fs.rmdir(layout.dir).catch(() => undefined);
      } catch (cleanupError) {
        throw new SnapshiftError('LAB_UP_FAILED', `lab up failed (${messageOf(error)}) and cleaning up failed too (${messageOf(cleanupError)}); run "snapshift lab down --dir ${layout.dir}"`, { cause: error });
      }
      throw error;
    }
  }

  /** The lab already up in `dir`; fails with a clear message if there is none. */
  static async open(dir: string = defaultLabDir): Promise<Lab> {
    const layout = new LabLayout(dir);
    if (!(await readLabState(layout.stateFile))) throw notUp(layout.dir);
    return new Lab(layout);
  }

  /**
   * Removes the lab in `dir` using its state file alone: ends recorded processes (only if /proc/PID/cmdline
   * still matches), unmounts, detaches loop devices backed by its image files, deletes the images and run
   * folders. Progress is written back after each step, so an interrupted down can simply be run again.
   */
  static async down(dir: string = defaultLabDir, options: LabDownOptions = {}): Promise<LabDownReport> {
    const layout = new LabLayout(dir);
    const report: LabDownReport = { dir: layout.dir, wasUp: false, endedPids: [], removedDatastores: [] };
    const state = await readLabState(layout.stateFile);
    if (state) {
      report.wasUp = true;
      const lab = new Lab(layout);
      // Every process first (they hold files on the datastores), but the ZFS daemon only after its pool is gone.
      for (const process of state.processes.filter((p) => p.label !== zfsDaemonLabel)) {
        if (await endOwnedProcess(process)) report.endedPids.push(process.pid);
        await lab.forgetProcess(process.label);
      }
      Object.assign(report, await lab.zfsDown());
      for (const datastore of [...state.datastores].reverse()) {
        await removeDatastore(datastore);
        report.removedDatastores.push(datastore.kind);
        await lab.#update((current) => {
          current.datastores = current.datastores.filter((d) => d.kind !== datastore.kind);
        });
      }
    }
    // Only folders we made, and only after every mount under them is gone (removeDatastore rmdirs those).
    for (const mountPoint of [...datastoreKinds.map((kind) => layout.mountPoint(kind)), layout.zfsMountPoint]) {
      if (await isMounted(mountPoint)) throw new SnapshiftError('LAB_UNMOUNT_FAILED', `${mountPoint} is still mounted; not removing the lab folder`);
    }
    await fs.rm(path.join(layout.dir, 'vms'), { recursive: true, force: true });
    await fs.rm(layout.tmpDir, { recursive: true, force: true });
    await fs.rm(path.join(layout.dir, 'ceph'), { recursive: true, force: true }); // lab ceph's data; its daemons ended above
    for (const emptyDir of [path.join(layout.dir, 'mnt'), path.join(layout.dir, 'images')]) await fs.rmdir(emptyDir).catch(() => undefined);
    if (options.purgeCache) await fs.rm(path.join(layout.dir, 'cache'), { recursive: true, force: true });
    await fs.rm(layout.stateFile, { force: true });
    await fs.rm(`${layout.stateFile}.lock`, { force: true });
    await fs.rmdir(layout.dir).catch(() => undefined);
    return report;
  }

  /** `Lab.down` of this lab. */
  async down(options: LabDownOptions = {}): Promise<LabDownReport> {
    return Lab.down(this.dir, options);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.down();
  }

  async state(): Promise<LabState> {
    const state = await readLabState(this.layout.stateFile);
    if (!state) throw notUp(this.dir);
    return state;
  }

  async status(): Promise<LabStatus> {
    const state = await readLabState(this.layout.stateFile);
    if (!state) return { dir: this.dir, up: false, datastores: [], vms: [], processes: [] };
    const datastores = await Promise.all(
      state.datastores.map(async (d) => ({ ...d, mounted: await isMounted(d.mountPoint), vmDisksDir: this.layout.vmDisksDir(d.kind), snapshotsDir: this.layout.snapshotsDir(d.kind) })),
    );
    const processes = await Promise.all(state.processes.map(async (p) => ({ ...p, running: await isOwnedProcessAlive(p) })));
    const vms = state.vms.map((vm) => {
      const process = processes.find((p) => p.label === vmProcessLabel(vm.name) && p.running);
      return { ...vm, running: process !== undefined, ...(process ? { pid: process.pid } : {}), qmpSocketPath: guestRunFiles(this.layout.vmRunDir(vm.name)).qmpSocket };
    });
    const zfs = state.zfs ? { ...state.zfs, imported: await zfsPoolImported(state.zfs.poolName), vmDisksDir: path.join(state.zfs.mountPoint, 'vms') } : undefined;
    const up = datastores.length === datastoreKinds.length && datastores.every((d) => d.mounted) && (zfs === undefined || zfs.imported);
    return { dir: this.dir, up, datastores, vms, processes, ...(zfs ? { zfs } : {}) };
  }

  /** Where a datastore keeps VM disks and snapshots (for storage providers and tests). */
  datastore(kind: DatastoreKind): { kind: DatastoreKind; mountPoint: string; vmDisksDir: string; snapshotsDir: string } {
    return { kind, mountPoint: this.layout.mountPoint(kind), vmDisksDir: this.layout.vmDisksDir(kind), snapshotsDir: this.layout.snapshotsDir(kind) };
  }

  /**
   * Adds a ZFS datastore to this lab: starts zfs-fuse unless a ZFS daemon already answers (then it is used,
   * never recorded, never ended), makes a pool named for this lab on a sparse file under the lab folder, with
   * the dataset `<pool>/vms` for VM disks. Each thing is recorded before it is made; a failure undoes it all.
   */
  async zfsUp(options: ZfsUpOptions = {}): Promise<LabZfs> {
    const sizeBytes = options.sizeBytes ?? defaultDatastoreSizeBytes;
    if (sizeBytes < minZfsPoolSizeBytes) throw new SnapshiftError('BAD_ARGUMENT', `ZFS pool size ${formatByteSize(sizeBytes)} is too small (at least ${formatByteSize(minZfsPoolSizeBytes)})`);
    const state = await this.state();
    if (state.zfs) {
      if (await zfsPoolImported(state.zfs.poolName)) return this.zfs();
      throw new SnapshiftError('LAB_BROKEN', `the lab's ZFS pool ${state.zfs.poolName} is recorded but not imported; run "snapshift lab zfs down --dir ${this.dir}" first`);
    }
    await checkZfsHost();
    try {
      await ensureZfsDaemon((daemon) => this.recordProcess(daemon));
      const zfsRecord = newZfsRecord(this.layout.zfsImageFile, this.layout.zfsMountPoint, sizeBytes);
      await this.#update((current) => {
        current.zfs = zfsRecord;
      });
      await fs.mkdir(path.dirname(zfsRecord.imagePath), { recursive: true });
      await createZfsPool(zfsRecord);
      return await this.zfs();
    } catch (error) {
      try {
        await this.zfsDown();
      } catch (cleanupError) {
        throw new SnapshiftError('LAB_ZFS_FAILED', `ZFS up failed (${messageOf(error)}) and cleaning up failed too (${messageOf(cleanupError)}); run "snapshift lab zfs down --dir ${this.dir}"`, { cause: error });
      }
      throw error;
    }
  }

  /** Removes exactly the lab's pool and, if this lab started it and no other pool uses it, zfs-fuse. */
  async zfsDown(): Promise<Pick<LabDownReport, 'removedZfsPool' | 'zfsDaemon'>> {
    const state = await this.state();
    const report: Pick<LabDownReport, 'removedZfsPool' | 'zfsDaemon'> = {};
    if (state.zfs) {
      await removeZfsPool(state.zfs);
      report.removedZfsPool = state.zfs.poolName;
      await this.#update((current) => {
        delete current.zfs;
      });
    }
    const daemon = state.processes.find((p) => p.label === zfsDaemonLabel);
    if (daemon) {
      report.zfsDaemon = await endZfsDaemon(daemon);
      await this.forgetProcess(daemon.label);
    }
    return report;
  }

  /** The ZFS datastore; fails with a clear message when `zfsUp` has not made one. */
  async zfs(): Promise<LabZfs> {
    const zfsRecord = (await this.state()).zfs;
    if (!zfsRecord) throw new SnapshiftError('LAB_DATASTORE_UNKNOWN', `the lab at ${this.dir} has no ZFS datastore (run "snapshift lab zfs up --dir ${this.dir}")`);
    return { poolName: zfsRecord.poolName, dataset: zfsRecord.dataset, mountPoint: zfsRecord.mountPoint, vmDisksDir: path.join(zfsRecord.mountPoint, 'vms') };
  }

  /** Defines a VM: a qcow2 disk on the datastore, `fillBytes` of random data at its start, the rest sparse. */
  async createVm(name: string, options: CreateVmOptions): Promise<VmRecord> {
    if (!vmNamePattern.test(name)) throw new SnapshiftError('BAD_ARGUMENT', `VM name "${name}" is not valid (lower-case letters, digits and "-", starting with a letter, at most 31)`);
    if (!isDatastoreKind(options.datastore)) throw new SnapshiftError('BAD_ARGUMENT', `unknown datastore "${options.datastore}" (the lab has: ${datastoreKinds.join(', ')})`);
    const kind = options.datastore;
    if (options.fillBytes > options.sizeBytes) throw new SnapshiftError('BAD_ARGUMENT', `fill ${formatByteSize(options.fillBytes)} is larger than the disk (${formatByteSize(options.sizeBytes)})`);
    if (options.sizeBytes <= 0 || options.sizeBytes % 512 !== 0) throw new SnapshiftError('BAD_ARGUMENT', `disk size ${options.sizeBytes} must be a positive multiple of 512 bytes`);
    const state = await this.state();
    if (!state.datastores.some((d) => d.kind === kind)) throw new SnapshiftError('LAB_DATASTORE_UNKNOWN', `datastore "${kind}" is not up in the lab at ${this.dir} (run "snapshift lab up" first)`);
    if (state.vms.some((vm) => vm.name === name)) throw new SnapshiftError('LAB_VM_EXISTS', `a lab VM named ${name} already exists`);
    const vm: VmRecord = {
      name,
      datastore: kind,
      diskPath: path.join(this.layout.vmDisksDir(kind), `${name}.qcow2`),
      sizeBytes: options.sizeBytes,
      fillBytes: options.fillBytes,
      createdAt: new Date().toISOString(),
    };
    await createVmDisk(vm.diskPath, vm.sizeBytes, vm.fillBytes, this.layout.tmpDir);
    await this.#update((current) => {
      current.vms.push(vm);
    });
    return vm;
  }

  /** Removes a VM (kills it if it runs) and its disk. */
  async removeVm(name: string): Promise<void> {
    const vm = await this.#vmRecord(name);
    const running = await this.runningVm(name);
    if (running) await running.kill();
    await fs.rm(vm.diskPath, { force: true });
    await fs.rm(this.layout.vmRunDir(name), { recursive: true, force: true });
    await this.#update((state) => {
      state.vms = state.vms.filter((v) => v.name !== name);
    });
  }

  /** The guest kernel and initramfs, from the cache or downloaded once (see guest-kernel.ts). */
  async guest(): Promise<{ kernel: GuestKernel; initramfsPath: string }> {
    const kernel = await ensureGuestKernel(this.layout.cacheDir);
    return { kernel, initramfsPath: await ensureGuestInitramfs(this.layout.cacheDir, kernel) };
  }

  /**
   * Boots the VM's tiny guest and waits until its workload runs (it then writes `rateMiBps` of random
   * O_DIRECT blocks and prints a heartbeat each second). The QEMU process is recorded before anything else.
   */
  async startVm(name: string, options: StartVmOptions = {}): Promise<LabVm> {
    const vm = await this.#vmRecord(name);
    if (await this.runningVm(name)) throw new SnapshiftError('LAB_VM_RUNNING', `lab VM ${name} is already running`);
    const rateMiBps = options.rateMiBps ?? 4;
    if (!(rateMiBps >= 0 && Number.isInteger(rateMiBps))) throw new SnapshiftError('BAD_ARGUMENT', `rate ${rateMiBps} MiB/s must be a whole number >= 0`);
    const guest = await this.guest();
    const runDir = this.layout.vmRunDir(name);
    const args = guestQemuArgs({
      name,
      diskPath: vm.diskPath,
      runDir,
      kernelPath: guest.kernel.vmlinuzPath,
      initramfsPath: guest.initramfsPath,
      rateMiBps,
      accelerator: options.accelerator ?? chooseAccelerator(),
      ...(options.memoryMiB ? { memoryMiB: options.memoryMiB } : {}),
    });
    const startedMs = Date.now();
    const pid = await launchGuestQemu(args, runDir);
    const process: ProcessRecord = { label: vmProcessLabel(name), pid, cmdline: [qemuProgram, ...args], startedAt: new Date(startedMs).toISOString() };
    await this.recordProcess(process);
    await fs.writeFile(guestRunFiles(runDir).pidFile, `${pid}\n`);
    const handle = new LabVm(vm, process, runDir, this);
    try {
      await this.#waitForWorkload(handle, options.bootTimeoutMs ?? 60_000);
    } catch (error) {
      await handle.kill();
      throw error;
    }
    handle.bootMs = Date.now() - startedMs;
    return handle;
  }

  /** A handle on a VM that runs now (e.g. started by another `snapshift lab vm start`), or undefined. */
  async runningVm(name: string): Promise<LabVm | undefined> {
    const state = await this.state();
    const vm = state.vms.find((v) => v.name === name);
    const process = state.processes.find((p) => p.label === vmProcessLabel(name));
    if (!vm || !process || !(await isOwnedProcessAlive(process))) return undefined;
    return new LabVm(vm, process, this.layout.vmRunDir(name), this);
  }

  /** Records a process the lab must end on down (used by VMs and by storage daemons). */
  async recordProcess(process: ProcessRecord): Promise<void> {
    await this.#update((state) => {
      state.processes = [...state.processes.filter((p) => p.label !== process.label), process];
    });
  }

  /** Drops a process record once the process has ended. */
  async forgetProcess(label: string): Promise<void> {
    await this.#update((state) => {
      state.processes = state.processes.filter((p) => p.label !== label);
    });
  }

  async #waitForWorkload(vm: LabVm, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = await readGuestConsole(vm.consoleLogPath);
      const events = parseGuestConsole(text);
      if (events.some((event) => event.kind === 'workload-start')) return;
      const fatal = events.find((event) => event.kind === 'fatal');
      const why = fatal?.kind === 'fatal' ? `failed: ${fatal.message}` : !(await vm.isRunning()) ? 'exited during boot' : Date.now() >= deadline ? `did not reach its workload within ${timeoutMs} ms` : undefined;
      if (why) {
        const qemuLog = consoleTail(await fs.readFile(guestRunFiles(vm.runDir).qemuLog, 'utf8').catch(() => ''), 3);
        throw new SnapshiftError('LAB_VM_FAILED', `lab VM ${vm.name} ${why}; console: ${consoleTail(text) || '(empty)'}${qemuLog ? `; qemu: ${qemuLog}` : ''}`);
      }
      await sleep(50);
    }
  }

  async #vmRecord(name: string): Promise<VmRecord> {
    const state = await this.state();
    const vm = state.vms.find((v) => v.name === name);
    if (!vm) throw new SnapshiftError('LAB_VM_UNKNOWN', `no lab VM named ${name} (known: ${state.vms.map((v) => v.name).join(', ') || 'none'}; create one with "snapshift lab vm create")`);
    return vm;
  }

  /** Read, change, write the state file atomically; one update at a time per lab in this process. */
  async #update(change: (state: LabState) => void): Promise<void> {
    const file = this.layout.stateFile;
    const previous = updateQueues.get(file) ?? Promise.resolve();
    const next = previous.catch(() => undefined).then(() =>
      withStateLock(file, async () => {
        const state = await readLabState(file);
        if (!state) throw notUp(this.dir);
        change(state);
        await writeLabState(file, state);
      }),
    );
    updateQueues.set(file, next);
    try {
      await next;
    } finally {
      if (updateQueues.get(file) === next) updateQueues.delete(file);
    }
  }
}

function notUp(dir: string): SnapshiftError {
  return new SnapshiftError('LAB_NOT_UP', `no lab is up in ${dir} (run "snapshift lab up --dir ${dir}")`);
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
