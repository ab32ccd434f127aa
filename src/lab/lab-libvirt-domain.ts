import { promises as fs } from 'node:fs';
import path from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import { xmlEscape } from '../hypervisor/libvirt/libvirt-xml.ts';
import type { Virsh } from '../hypervisor/libvirt/virsh.ts';
import { consoleTail, parseGuestConsole, readGuestConsole, readGuestHeartbeats, type GuestEvent, type Heartbeat } from './guest-console.ts';
import { sendGuestControl } from './guest-control.ts';
import { ensureGuestInitramfs } from './guest-initramfs.ts';
import { ensureGuestKernel } from './guest-kernel.ts';
import { sleep } from './owned-process.ts';
import { guestKernelCommandLine, qemuProgram } from './qemu-guest.ts';

/** What boots the lab's tiny guest: the kernel and initramfs the lab builds for its QEMU guests. */
export interface LabGuestBoot {
  kernelPath: string;
  initramfsPath: string;
}

/** The guest kernel and initramfs from `cacheDir` (downloaded and built once; see guest-kernel.ts). */
export async function labGuestBoot(cacheDir: string): Promise<LabGuestBoot> {
  const kernel = await ensureGuestKernel(cacheDir);
  return { kernelPath: kernel.vmlinuzPath, initramfsPath: await ensureGuestInitramfs(cacheDir, kernel) };
}

export interface LabDomainDisk {
  /** The image (it must exist). The guest's workload writes to the first disk only (/dev/vda). */
  path: string;
  format?: 'qcow2' | 'raw';
  /** Default vda, vdb, … in order. */
  target?: string;
}

export interface LabDomainOptions {
  name: string;
  disks: readonly LabDomainDisk[];
  /** Folder for the console log and sockets (made if missing; keep it short for socket paths). */
  runDir: string;
  guest: LabGuestBoot;
  /** The workload's write rate; default 1 MiB/s (TCG keeps up, overlays stay small). */
  rateMiBps?: number;
  memoryMiB?: number;
  /**
   * A qemu-guest-agent channel (`org.qemu.guest_agent.0`): on `<runDir>/qga.sock` (QEMU listens), or with
   * `connectTo`, QEMU connects to a socket the test serves; libvirt's agent then connects to that socket too
   * (libvirt opens the channel's path as a client once the guest opened its side of the port), which lets a
   * host-run qemu-ga stand in for the guest's.
   */
  guestAgent?: boolean | { connectTo: string };
  /** An extra QMP monitor on `<runDir>/qmp.sock` for tests to observe QEMU (taints the domain). */
  observerQmp?: boolean;
  /** A fixed UUID: checkpoint XML names its domain's UUID, so a re-created transient domain must keep it. */
  uuid?: string;
  /** `virsh define` + `start` (a persistent domain) instead of `virsh create` (a transient one). */
  persistent?: boolean;
  /** How long the guest may take to reach its workload; default 60 s (TCG boots in ~3 s). */
  bootTimeoutMs?: number;
}

/** Files of a lab domain in its run folder. */
export function labDomainFiles(runDir: string): { consoleLog: string; controlSocket: string; agentSocket: string; qmpSocket: string; definition: string } {
  return {
    consoleLog: path.join(runDir, 'console.log'),
    controlSocket: path.join(runDir, 'ctl.sock'),
    agentSocket: path.join(runDir, 'qga.sock'),
    qmpSocket: path.join(runDir, 'qmp.sock'),
    definition: path.join(runDir, 'domain.xml'),
  };
}

/**
 * The domain XML of a lab guest under TCG (`type='qemu'`): kernel and initramfs booted directly, ttyS0 to
 * the console log (heartbeats), ttyS1 on a unix socket (STOP), virtio disks, QEMU as root with nothing
 * relabelled (`seclabel` static +0:+0, relabel='no').
 */
export function labDomainXml(options: LabDomainOptions): string {
  const files = labDomainFiles(options.runDir);
  const e = xmlEscape;
  const disks = options.disks.map((disk, index) => {
    const target = disk.target ?? `vd${String.fromCharCode(97 + index)}`;
    return `    <disk type='file' device='disk'><driver name='qemu' type='${disk.format ?? 'qcow2'}'/><source file='${e(disk.path)}'/><target dev='${e(target)}' bus='virtio'/></disk>`;
  });
  const agentSource = typeof options.guestAgent === 'object' ? `mode='connect' path='${e(options.guestAgent.connectTo)}'` : `mode='bind' path='${e(files.agentSocket)}'`;
  const agent = options.guestAgent
    ? [`    <channel type='unix'><source ${agentSource}/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>`]
    : [];
  const qmp = options.observerQmp
    ? [`  <qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:${e(files.qmpSocket)},server=on,wait=off'/></qemu:commandline>`]
    : [];
  return [
    `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>`,
    `  <name>${e(options.name)}</name>`,
    ...(options.uuid ? [`  <uuid>${e(options.uuid)}</uuid>`] : []),
    `  <memory unit='MiB'>${options.memoryMiB ?? 256}</memory>`,
    `  <vcpu>1</vcpu>`,
    `  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>${e(options.guest.kernelPath)}</kernel><initrd>${e(options.guest.initramfsPath)}</initrd>`,
    `    <cmdline>${e(guestKernelCommandLine(options.rateMiBps ?? 1))}</cmdline></os>`,
    `  <features><acpi/></features>`,
    `  <cpu mode='maximum' check='none'/>`,
    `  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>`,
    `  <devices>`,
    `    <emulator>/usr/bin/${qemuProgram}</emulator>`,
    ...disks,
    `    <serial type='file'><source path='${e(files.consoleLog)}'/><target port='0'/></serial>`,
    `    <serial type='unix'><source mode='bind' path='${e(files.controlSocket)}'/><target port='1'/></serial>`,
    ...agent,
    `    <controller type='usb' model='none'/>`,
    `    <memballoon model='none'/>`,
    `  </devices>`,
    `  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>`,
    ...qmp,
    `</domain>`,
    '',
  ].join('\n');
}

/**
 * A lab guest run by libvirt. Disposing destroys it (and undefines a persistent one), so
 * `await using domain = await LabDomain.start(virsh, …)` never leaks a QEMU.
 */
export class LabDomain implements AsyncDisposable {
  readonly name: string;
  readonly uuid: string;
  readonly persistent: boolean;
  readonly consoleLogPath: string;
  readonly controlSocketPath: string;
  readonly agentSocketPath: string | undefined;
  readonly qmpSocketPath: string | undefined;
  /** From `virsh create`/`start` to the guest's WORKLOAD_START line. */
  bootMs = 0;
  readonly #virsh: Virsh;
  readonly #runDir: string;

  private constructor(virsh: Virsh, options: LabDomainOptions, uuid: string) {
    const files = labDomainFiles(options.runDir);
    this.#virsh = virsh;
    this.#runDir = options.runDir;
    this.name = options.name;
    this.uuid = uuid;
    this.persistent = options.persistent ?? false;
    this.consoleLogPath = files.consoleLog;
    this.controlSocketPath = files.controlSocket;
    this.agentSocketPath = typeof options.guestAgent === 'object' ? options.guestAgent.connectTo : options.guestAgent ? files.agentSocket : undefined;
    this.qmpSocketPath = options.observerQmp ? files.qmpSocket : undefined;
  }

  /** Creates (or defines and starts) the domain and waits until the guest's workload runs. */
  static async start(virsh: Virsh, options: LabDomainOptions): Promise<LabDomain> {
    if (options.disks.length === 0) throw new SnapshiftError('BAD_ARGUMENT', `lab domain ${options.name} needs at least one disk`);
    const files = labDomainFiles(options.runDir);
    await fs.mkdir(options.runDir, { recursive: true });
    for (const file of [files.consoleLog, files.controlSocket, files.agentSocket, files.qmpSocket]) await fs.rm(file, { force: true });
    await fs.writeFile(files.definition, labDomainXml(options));
    const started = Date.now();
    if (options.persistent) {
      await virsh.run(['define', files.definition]);
      await virsh.run(['start', options.name]);
    } else {
      await virsh.run(['create', files.definition]);
    }
    const uuid = (await virsh.domain(options.name)).uuid;
    const domain = new LabDomain(virsh, options, uuid);
    try {
      await domain.#waitForWorkload(options.bootTimeoutMs ?? 60_000);
    } catch (error) {
      await domain.destroy();
      throw error;
    }
    domain.bootMs = Date.now() - started;
    return domain;
  }

  /** Starts a persistent domain again (after `destroy({ keepDefinition: true })`) and waits for its workload. */
  async restart(options: { bootTimeoutMs?: number } = {}): Promise<void> {
    if (!this.persistent) throw new SnapshiftError('BAD_ARGUMENT', `lab domain ${this.name} is transient: create a new one`);
    await fs.rm(this.consoleLogPath, { force: true });
    const started = Date.now();
    await this.#virsh.run(['start', this.name]);
    await this.#waitForWorkload(options.bootTimeoutMs ?? 60_000);
    this.bootMs = Date.now() - started;
  }

  async events(): Promise<GuestEvent[]> {
    return parseGuestConsole(await readGuestConsole(this.consoleLogPath));
  }

  async heartbeats(): Promise<Heartbeat[]> {
    return readGuestHeartbeats(this.consoleLogPath);
  }

  /** Waits until at least `count` heartbeats were printed since the guest started. */
  async waitForHeartbeats(count: number, timeoutMs = 30_000): Promise<Heartbeat[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const heartbeats = await this.heartbeats();
      if (heartbeats.length >= count) return heartbeats;
      if (Date.now() >= deadline) throw await this.#failure(`printed ${heartbeats.length} of ${count} heartbeats within ${timeoutMs} ms`);
      await sleep(200);
    }
  }

  /** True while libvirt runs the domain. */
  async isRunning(): Promise<boolean> {
    return (await this.#virsh.listDomains()).some((domain) => domain.name === this.name && domain.state === 'running');
  }

  /**
   * Writes `lengthBytes` of `pattern` at `offsetBytes` to a disk from the host side, as if the guest had
   * (HMP `qemu-io` on the disk's virtio device): deterministic writes to check dirty bitmaps and points in
   * time. Needs no guest cooperation; taints the domain ("custom monitor commands").
   */
  async writePattern(diskTarget: string, offsetBytes: number, lengthBytes: number, pattern: number): Promise<void> {
    const disk = (await this.#virsh.disks(this.name)).find((candidate) => candidate.target === diskTarget);
    if (!disk?.alias) throw new SnapshiftError('BAD_ARGUMENT', `lab domain ${this.name} has no disk ${diskTarget} with a device alias`);
    const command = `qemu-io -d /machine/peripheral/${disk.alias}/virtio-backend "write -P 0x${pattern.toString(16)} ${offsetBytes} ${lengthBytes}"`;
    const output = await this.#virsh.run(['qemu-monitor-command', this.name, '--hmp', command]);
    if (/error|failed/i.test(output)) throw new SnapshiftError('LIBVIRT_COMMAND_FAILED', `qemu-io on ${this.name} ${diskTarget}: ${output.trim()}`);
  }

  /** Asks the guest to stop writing; it prints the md5 of /dev/vda and powers off (libvirt then ends the domain). */
  async stopGuest(timeoutMs = 180_000): Promise<string> {
    await sendGuestControl(this.controlSocketPath, 'STOP');
    const deadline = Date.now() + timeoutMs;
    while (await this.isRunning()) {
      if (Date.now() > deadline) throw await this.#failure('did not power off after STOP');
      await sleep(200);
    }
    const md5 = [...(await this.events())].reverse().find((event) => event.kind === 'md5');
    if (md5?.kind !== 'md5') throw await this.#failure('powered off without printing the md5 of its disk');
    return md5.md5;
  }

  /** Destroys the domain if it runs; a persistent one is undefined too unless `keepDefinition`. */
  async destroy(options: { keepDefinition?: boolean } = {}): Promise<void> {
    const domains = await this.#virsh.listDomains();
    const mine = domains.find((domain) => domain.name === this.name);
    if (mine && mine.state !== 'shut-off') await this.#virsh.destroy(this.name);
    if (this.persistent && !options.keepDefinition && mine) await this.#virsh.run(['undefine', this.name, '--checkpoints-metadata', '--snapshots-metadata']);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.destroy();
  }

  async #waitForWorkload(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const events = await this.events();
      if (events.some((event) => event.kind === 'workload-start')) return;
      const fatal = events.find((event) => event.kind === 'fatal');
      if (fatal?.kind === 'fatal') throw await this.#failure(`failed: ${fatal.message}`);
      if (Date.now() >= deadline) throw await this.#failure(`did not reach its workload within ${timeoutMs} ms`);
      await sleep(100);
    }
  }

  async #failure(what: string): Promise<SnapshiftError> {
    const console = consoleTail(await readGuestConsole(this.consoleLogPath));
    return new SnapshiftError('LAB_VM_FAILED', `lab domain ${this.name} ${what}; console: ${console || '(empty)'} (run folder ${this.#runDir})`);
  }
}
