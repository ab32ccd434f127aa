import { promises as fs } from 'node:fs';
import { SnapshiftError } from '../core/errors.ts';
import { consoleTail, parseGuestConsole, readGuestConsole, readGuestHeartbeats, type GuestEvent, type Heartbeat } from './guest-console.ts';
import { sendGuestControl } from './guest-control.ts';
import type { ProcessRecord, VmRecord } from './lab-state.ts';
import { endOwnedProcess, isOwnedProcessAlive, sleep, waitForExit } from './owned-process.ts';
import { guestBlockNames, guestRunFiles } from './qemu-guest.ts';

/** What a stopped guest reports: the md5 of its whole disk, computed inside the guest after its last write. */
export interface GuestStopResult {
  md5: string;
  writes: number;
  writtenMiB: number;
}

/** The lab's side of a VM handle: forgetting the process once it has ended. */
export interface LabVmOwner {
  forgetProcess(label: string): Promise<void>;
}

/** Label under which a VM's QEMU process is recorded in the lab state. */
export function vmProcessLabel(name: string): string {
  return `vm:${name}`;
}

/**
 * A running lab guest: where to reach it (QMP socket, disk, stable block node names) and how to end it.
 * Disposing kills it if it still runs, so `await using vm = await lab.startVm(...)` never leaks a QEMU.
 */
export class LabVm implements AsyncDisposable {
  readonly name: string;
  readonly diskPath: string;
  readonly pid: number;
  readonly runDir: string;
  readonly qmpSocketPath: string;
  /** A second QMP monitor for tests, usable while the engine holds `qmpSocketPath`. */
  readonly labQmpSocketPath: string;
  readonly controlSocketPath: string;
  readonly consoleLogPath: string;
  /** Block node names and qdev id (see guestBlockNames). */
  readonly blockNames: { fileNode: string; formatNode: string; qdevId: string };
  /** From QEMU start to the guest's WORKLOAD_START line, when this handle came from startVm. */
  bootMs?: number;
  readonly #process: ProcessRecord;
  readonly #owner: LabVmOwner;

  constructor(vm: VmRecord, process: ProcessRecord, runDir: string, owner: LabVmOwner) {
    const files = guestRunFiles(runDir);
    this.name = vm.name;
    this.diskPath = vm.diskPath;
    this.pid = process.pid;
    this.runDir = runDir;
    this.qmpSocketPath = files.qmpSocket;
    this.labQmpSocketPath = files.labQmpSocket;
    this.controlSocketPath = files.controlSocket;
    this.consoleLogPath = files.consoleLog;
    this.blockNames = guestBlockNames(vm.name);
    this.#process = process;
    this.#owner = owner;
  }

  /** Everything the guest has said on its console so far. */
  async events(): Promise<GuestEvent[]> {
    return parseGuestConsole(await readGuestConsole(this.consoleLogPath));
  }

  /** The heartbeats so far, oldest first: writes and MiB written keep growing while the guest writes. */
  async heartbeats(): Promise<Heartbeat[]> {
    return readGuestHeartbeats(this.consoleLogPath);
  }

  /** Waits until at least `count` heartbeats were printed. */
  async waitForHeartbeats(count: number, timeoutMs = 30_000): Promise<Heartbeat[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const heartbeats = await this.heartbeats();
      if (heartbeats.length >= count) return heartbeats;
      if (!(await this.isRunning())) throw await this.#failure('stopped before printing enough heartbeats');
      if (Date.now() >= deadline) throw await this.#failure(`printed ${heartbeats.length} of ${count} heartbeats within ${timeoutMs} ms`);
      await sleep(200);
    }
  }

  async isRunning(): Promise<boolean> {
    return isOwnedProcessAlive(this.#process);
  }

  /**
   * Asks the guest to stop writing; it syncs, prints the md5 of its disk and powers off. Under TCG the md5
   * takes ~5 s for 256 MiB (~40 s for 2 GiB), hence the generous default timeout.
   */
  async stop(options: { timeoutMs?: number } = {}): Promise<GuestStopResult> {
    if (!(await this.isRunning())) throw await this.#failure('is not running');
    await sendGuestControl(this.controlSocketPath, 'STOP');
    const exited = await waitForExit(this.pid, options.timeoutMs ?? 180_000);
    if (!exited) {
      await this.kill();
      throw await this.#failure('did not power off after STOP; killed it');
    }
    await this.#owner.forgetProcess(this.#process.label);
    const events = await this.events();
    const md5 = [...events].reverse().find((event) => event.kind === 'md5');
    const stop = [...events].reverse().find((event) => event.kind === 'workload-stop');
    if (md5?.kind !== 'md5' || stop?.kind !== 'workload-stop') throw await this.#failure('powered off without printing the md5 of its disk');
    return { md5: md5.md5, writes: stop.writes, writtenMiB: stop.writtenMiB };
  }

  /** Hard stop (like pulling the plug): the disk keeps whatever the guest had written. */
  async kill(): Promise<void> {
    await endOwnedProcess(this.#process, { signal: 'SIGKILL' });
    await this.#owner.forgetProcess(this.#process.label);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }

  async #failure(what: string): Promise<SnapshiftError> {
    const console = consoleTail(await readGuestConsole(this.consoleLogPath));
    const qemuLog = consoleTail(await fs.readFile(guestRunFiles(this.runDir).qemuLog, 'utf8').catch(() => ''), 3);
    return new SnapshiftError('LAB_VM_FAILED', `lab VM ${this.name} (pid ${this.pid}) ${what}; console: ${console || '(empty)'}${qemuLog ? `; qemu: ${qemuLog}` : ''}`);
  }
}
