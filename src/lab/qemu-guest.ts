import { promises as fs, openSync, closeSync } from 'node:fs';
import { chooseAccelerator, type Accelerator } from '../hypervisor/qemu/accelerator.ts';
import path from 'node:path';
import { spawn } from 'node:child_process';

export { chooseAccelerator, type Accelerator } from '../hypervisor/qemu/accelerator.ts';

/**
 * Stable names a QEMU guest of the lab exposes, for the hypervisor adapter and tests:
 *   QMP block node of the image file (protocol): `<vm>-disk0-file`
 *   QMP block node of the qcow2 format layer:    `<vm>-disk0`
 *   virtio-blk qdev id:                           `vda` (QOM path /machine/peripheral/vda)
 */
export function guestBlockNames(vmName: string): { fileNode: string; formatNode: string; qdevId: string } {
  return { fileNode: `${vmName}-disk0-file`, formatNode: `${vmName}-disk0`, qdevId: 'vda' };
}

/** Files of a running guest, all in its run folder. */
export function guestRunFiles(runDir: string): { qmpSocket: string; labQmpSocket: string; controlSocket: string; consoleLog: string; qemuLog: string; pidFile: string } {
  return {
    qmpSocket: path.join(runDir, 'qmp.sock'),
    labQmpSocket: path.join(runDir, 'lab-qmp.sock'),
    controlSocket: path.join(runDir, 'ctl.sock'),
    consoleLog: path.join(runDir, 'console.log'),
    qemuLog: path.join(runDir, 'qemu.log'),
    pidFile: path.join(runDir, 'pid'),
  };
}

export interface GuestLaunch {
  name: string;
  diskPath: string;
  runDir: string;
  kernelPath: string;
  initramfsPath: string;
  rateMiBps: number;
  memoryMiB?: number;
  accelerator?: Accelerator;
}

/** The qemu-system-x86_64 command line of a lab guest (argv without the program). */
export function guestQemuArgs(launch: GuestLaunch): string[] {
  const accelerator = launch.accelerator ?? chooseAccelerator();
  const files = guestRunFiles(launch.runDir);
  const names = guestBlockNames(launch.name);
  return [
    '-name', launch.name,
    '-machine', `pc,accel=${accelerator}`,
    '-cpu', accelerator === 'kvm' ? 'host,-arch-capabilities' : 'max',
    '-smp', '1', '-m', String(launch.memoryMiB ?? 256),
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-kernel', launch.kernelPath, '-initrd', launch.initramfsPath,
    '-append', guestKernelCommandLine(launch.rateMiBps),
    '-serial', `file:${files.consoleLog}`,
    '-chardev', `socket,id=ctl,path=${files.controlSocket},server=on,wait=off`, '-serial', 'chardev:ctl',
    '-qmp', `unix:${files.qmpSocket},server=on,wait=off`,
    // A second monitor for tests (pause and resume the guest) while the engine holds the first: QMP serves one client per socket.
    '-qmp', `unix:${files.labQmpSocket},server=on,wait=off`,
    '-blockdev', `driver=file,node-name=${names.fileNode},filename=${launch.diskPath},cache.direct=off`,
    '-blockdev', `driver=qcow2,node-name=${names.formatNode},file=${names.fileNode},cache.direct=off`,
    '-device', `virtio-blk-pci,drive=${names.formatNode},id=${names.qdevId}`,
  ];
}

/** The guest kernel's command line: console on ttyS0 and the workload's knobs (guest-init-script.ts). */
export function guestKernelCommandLine(rateMiBps: number): string {
  return `console=ttyS0 quiet panic=-1 lab.rate=${rateMiBps} lab.bs=64 lab.secs=0 lab.direct=1 lab.md5=1`;
}

export const qemuProgram = 'qemu-system-x86_64';

/**
 * Starts QEMU detached (own session, no pipes to us), so it outlives the command that started it, as a lab
 * VM must (`lab vm start` returns; `lab down` ends it later). Its stderr goes to qemu.log in the run folder.
 * Returns the PID at once, so the caller can record it before doing anything else.
 */
export async function launchGuestQemu(args: readonly string[], runDir: string): Promise<number> {
  const files = guestRunFiles(runDir);
  await fs.mkdir(runDir, { recursive: true });
  for (const file of [files.qmpSocket, files.labQmpSocket, files.controlSocket, files.consoleLog, files.qemuLog, files.pidFile]) await fs.rm(file, { force: true });
  const log = openSync(files.qemuLog, 'a');
  try {
    const child = spawn(qemuProgram, args, { detached: true, stdio: ['ignore', log, log] });
    const pid = await new Promise<number>((resolve, reject) => {
      child.once('spawn', () => resolve(child.pid!));
      child.once('error', reject);
    });
    child.unref();
    return pid;
  } finally {
    closeSync(log);
  }
}
