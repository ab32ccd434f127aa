import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { join } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import { chooseAccelerator } from '../../hypervisor/qemu/accelerator.ts';
import type { QemuVmConfiguration } from '../../hypervisor/hypervisor.ts';

export const qemuSystemProgram = 'qemu-system-x86_64';

/** One disk of a VM to launch: the block nodes (`-blockdev` JSON, bottom first) and the node its device uses. */
export interface LaunchDisk {
  /** The guest device id (the disk's name in the restore point: vda, …). */
  name: string;
  /** qdev model; default virtio-blk-pci. */
  device: string | null;
  nodes: Array<Record<string, unknown>>;
  topNodeName: string;
  /** Pause the guest on a read or write error instead of passing it to the guest (instant recovery). */
  stopOnError?: boolean;
}

export interface QemuLaunchPlan {
  name: string;
  uuid: string;
  /** Folder for the QMP socket, serial logs and sockets, the PID file and QEMU's log. Keep it short: socket paths. */
  runDir: string;
  configuration: QemuVmConfiguration;
  disks: readonly LaunchDisk[];
  /** The NICs' MAC addresses, in the configuration's order (new ones when restored beside the original). */
  macs: readonly string[];
  /** "none" starts the VM with no network at all (boot verification); "user" gives each NIC QEMU's user-mode network. */
  network: 'none' | 'user';
}

/** Files of a launched VM in its run folder. */
export function launchFiles(runDir: string): { qmpSocket: string; pidFile: string; qemuLog: string; agentSocket: string; serial: (index: number, kind: 'file' | 'unix-socket') => string } {
  return {
    qmpSocket: join(runDir, 'qmp.sock'),
    pidFile: join(runDir, 'qemu.pid'),
    qemuLog: join(runDir, 'qemu.log'),
    agentSocket: join(runDir, 'qga.sock'),
    // serial0 to a file is the console: console.log, as on the source; others by index.
    serial: (index, kind) => join(runDir, kind === 'file' ? (index === 0 ? 'console.log' : `serial${index}.log`) : `serial${index}.sock`),
  };
}

/**
 * The qemu-system command line that starts the VM a configuration describes, with the given disks, in the
 * run folder: the machine, CPU, memory and direct-boot kernel as captured; serial ports that went to a file
 * or a unix socket go to one in the run folder; QMP on `<runDir>/qmp.sock`. The accelerator is what works on
 * this host (KVM only where it really does), so a VM backed up on KVM restores on a TCG-only host too.
 */
export function qemuLaunchArgs(plan: QemuLaunchPlan): string[] {
  const config = plan.configuration;
  const files = launchFiles(plan.runDir);
  const accelerator = chooseAccelerator();
  const cpuModel = config.cpuModel && !(config.cpuModel === 'host' && accelerator !== 'kvm') ? config.cpuModel : accelerator === 'kvm' ? 'host' : 'max';
  const args = [
    '-name', plan.name,
    '-uuid', plan.uuid,
    '-machine', `${config.machine ?? 'pc'},accel=${accelerator}`,
    '-cpu', cpuModel,
    '-smp', String(config.cpuCount ?? 1),
    '-m', `${Math.max(16, Math.round((config.memoryBytes ?? 512 * 1024 * 1024) / (1024 * 1024)))}M`,
    '-nodefaults', '-no-user-config', '-display', 'none',
    '-qmp', `unix:${files.qmpSocket},server=on,wait=off`,
  ];
  if (config.directBoot) {
    args.push('-kernel', config.directBoot.kernel);
    if (config.directBoot.initrd) args.push('-initrd', config.directBoot.initrd);
    if (config.directBoot.append) args.push('-append', config.directBoot.append);
  }
  for (const serial of config.serials ?? []) {
    const id = `serial${serial.index}`;
    if (serial.backend === 'file') args.push('-chardev', `file,id=${id},path=${escapeOption(files.serial(serial.index, 'file'))}`);
    else if (serial.backend === 'unix-socket') args.push('-chardev', `socket,id=${id},path=${escapeOption(files.serial(serial.index, 'unix-socket'))},server=on,wait=off`);
    else if (serial.backend === 'pty') args.push('-chardev', `pty,id=${id}`);
    else args.push('-chardev', `null,id=${id}`);
    args.push('-device', `isa-serial,chardev=${id},index=${serial.index}`);
  }
  for (const disk of plan.disks) {
    for (const node of disk.nodes) args.push('-blockdev', JSON.stringify(node));
    const errorPolicy = disk.stopOnError ? ',werror=stop,rerror=stop' : '';
    args.push('-device', `${disk.device ?? 'virtio-blk-pci'},drive=${disk.topNodeName},id=${disk.name}${errorPolicy}`);
  }
  (config.nics ?? []).forEach((nic, index) => {
    if (plan.network === 'none') return;
    const id = nic.id ?? `net${index}`;
    args.push('-netdev', `user,id=${id}-backend`, '-device', `${nic.model},netdev=${id}-backend,id=${id},mac=${plan.macs[index] ?? nic.mac}`);
  });
  if (config.guestAgent) {
    args.push(
      '-chardev', `socket,id=qga0,path=${escapeOption(files.agentSocket)},server=on,wait=off`,
      '-device', 'virtio-serial-pci,id=snapshift-virtio-serial',
      '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
    );
  }
  return args;
}

/** The two block nodes of a qcow2 or raw image file: the file, and the format layer on it (the device's drive). */
export function imageNodes(name: string, path: string, format: 'qcow2' | 'raw'): Pick<LaunchDisk, 'nodes' | 'topNodeName'> {
  const fileNode = `${name}-file`;
  return {
    nodes: [
      { driver: 'file', 'node-name': fileNode, filename: path },
      { driver: format, 'node-name': `${name}-format`, file: fileNode },
    ],
    topNodeName: `${name}-format`,
  };
}

/**
 * Writes the launch unit of a restored VM into its folder: `launch.json` (program and arguments) and
 * `start.sh`, which starts it detached (QEMU daemonizes, its PID in qemu.pid in the run folder, where its
 * QMP socket and serial files are too).
 */
export async function writeLaunchUnit(unitFolder: string, runDir: string, args: readonly string[]): Promise<{ launchJson: string; startScript: string }> {
  const files = launchFiles(runDir);
  const launchJson = join(unitFolder, 'launch.json');
  const startScript = join(unitFolder, 'start.sh');
  await fs.writeFile(launchJson, `${JSON.stringify({ program: qemuSystemProgram, args }, null, 2)}\n`);
  const quoted = [qemuSystemProgram, ...args, '-daemonize', '-pidfile', files.pidFile].map(shellQuote).join(' \\\n  ');
  await fs.writeFile(startScript, `#!/bin/sh\n# Starts the VM restored by snapshift; stop it with QMP "quit" on ${files.qmpSocket}.\nmkdir -p ${shellQuote(runDir)}\nexec ${quoted}\n`, { mode: 0o755 });
  return { launchJson, startScript };
}

/**
 * Starts QEMU daemonized: it returns once QEMU has set everything up (or failed, with its own error), and
 * the PID of the daemon comes from its PID file.
 */
export async function launchQemu(runDir: string, args: readonly string[]): Promise<{ pid: number }> {
  const files = launchFiles(runDir);
  await fs.rm(files.pidFile, { force: true });
  await fs.rm(files.qmpSocket, { force: true });
  const child = spawn(qemuSystemProgram, [...args, '-daemonize', '-pidfile', files.pidFile, '-D', files.qemuLog], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
  const status = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code) => resolve(code));
  }).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') throw new SnapshiftError('PROGRAM_MISSING', `${qemuSystemProgram} is not installed (bash scripts/setup.sh installs it)`);
    throw error;
  });
  if (status !== 0) {
    throw new SnapshiftError('VM_START_FAILED', `QEMU did not start the VM: ${stderr.trim().split('\n').slice(-3).join(' ') || `exit status ${status}`}`);
  }
  const pid = Number((await fs.readFile(files.pidFile, 'utf8')).trim());
  if (!Number.isSafeInteger(pid) || pid <= 0) throw new SnapshiftError('VM_START_FAILED', `QEMU started but wrote no PID to ${files.pidFile}`);
  return { pid };
}

/** QEMU's option syntax: a comma in a value is written twice. */
function escapeOption(value: string): string {
  return value.replaceAll(',', ',,');
}

function shellQuote(value: string): string {
  return /^[\w@%+=:,./-]+$/.test(value) ? value : `'${value.replaceAll("'", `'\\''`)}'`;
}

/** A random locally administered unicast MAC in QEMU's 52:54:00 range. */
export function randomMac(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(3));
  return ['52', '54', '00', ...[...bytes].map((byte) => byte.toString(16).padStart(2, '0'))].join(':');
}
