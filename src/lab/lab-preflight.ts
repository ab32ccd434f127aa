import { promises as fs, constants } from 'node:fs';
import path from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import { pathExists } from '../core/fs-probe.ts';

/**
 * The loop-control device the check looks for. SNAPSHIFT_LAB_LOOP_CONTROL overrides it so tests can
 * simulate a host without loop devices (e.g. SNAPSHIFT_LAB_LOOP_CONTROL=/nonexistent); nothing else reads it.
 */
export function loopControlPath(): string {
  return process.env['SNAPSHIFT_LAB_LOOP_CONTROL'] ?? '/dev/loop-control';
}

/** Programs `lab up` runs, and the Debian package that brings each. */
const requiredPrograms: ReadonlyArray<[program: string, debianPackage: string]> = [
  ['losetup', 'mount'],
  ['mount', 'mount'],
  ['umount', 'mount'],
  ['mkfs.btrfs', 'btrfs-progs'],
  ['btrfs', 'btrfs-progs'],
  ['mkfs.xfs', 'xfsprogs'],
  ['qemu-img', 'qemu-utils'],
];

/**
 * Checks, before anything is made, that this host can hold a lab: root, loop devices, the programs.
 * Throws one SnapshiftError naming everything missing, so a failed `lab up` leaves nothing behind.
 */
export async function checkLabHost(): Promise<void> {
  const missing: string[] = [];
  if (process.getuid?.() !== 0) missing.push('root (lab up attaches loop devices and mounts filesystems; run it as root)');
  const loopControl = loopControlPath();
  if (!(await pathExists(loopControl))) missing.push(`loop devices (${loopControl} does not exist; load the "loop" kernel module or run on a host that has it)`);
  const programs: string[] = [];
  for (const [program, debianPackage] of requiredPrograms) {
    if (!(await onPath(program))) programs.push(`${program} (apt-get install ${debianPackage})`);
  }
  if (programs.length > 0) missing.push(`programs: ${programs.join(', ')}`);
  if (missing.length > 0) throw new SnapshiftError('LAB_HOST_UNFIT', `cannot bring the lab up, missing: ${missing.join('; ')}`);
}

/** Whether `program` is an executable on PATH (plus the sbin folders a non-login root shell may lack). */
export async function onPath(program: string): Promise<boolean> {
  const dirs = [...(process.env['PATH'] ?? '').split(':'), '/usr/sbin', '/sbin'];
  for (const dir of dirs) {
    if (dir === '') continue;
    try {
      await fs.access(path.join(dir, program), constants.X_OK);
      return true;
    } catch {
      // not in this folder
    }
  }
  return false;
}
