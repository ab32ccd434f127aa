import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { SnapshiftError } from '../core/errors.ts';
import type { GuestKernel } from './guest-kernel.ts';
import { guestInitScript } from './guest-init-script.ts';
import { newcArchive, type NewcEntry } from './newc-archive.ts';

/** busybox-static's binary: the guest's whole userland (it must be static; the initramfs has no libc). */
const busyboxCandidates = ['/bin/busybox', '/usr/bin/busybox'];

/**
 * The guest's initramfs (gzip'd newc cpio: /init, busybox, the virtio modules), built once per kernel and
 * init script and kept in the cache under a name derived from its inputs.
 */
export async function ensureGuestInitramfs(cacheDir: string, kernel: GuestKernel): Promise<string> {
  const init = guestInitScript(kernel.modules.map((module) => module.name));
  const busyboxPath = await findBusybox();
  const busybox = await fs.readFile(busyboxPath);
  const modules = await Promise.all(kernel.modules.map(async (module) => ({ name: module.name, data: await fs.readFile(module.path) })));
  const hash = createHash('sha256').update(init).update(busybox).update(kernel.kernelVersion);
  for (const module of modules) hash.update(module.data);
  const target = path.join(cacheDir, 'initramfs', `initramfs-${hash.digest('hex').slice(0, 16)}.gz`);
  try {
    await fs.access(target);
    return target;
  } catch {
    // not built yet
  }
  const entries: NewcEntry[] = [
    ...['bin', 'sbin', 'usr', 'usr/bin', 'usr/sbin', 'proc', 'sys', 'dev', 'tmp', 'lib', 'lib/modules'].map((dir) => ({ kind: 'dir' as const, path: dir })),
    // init's stdout: the kernel opens /dev/console before devtmpfs is mounted
    { kind: 'char-device', path: 'dev/console', major: 5, minor: 1 },
    { kind: 'file', path: 'bin/busybox', data: busybox, mode: 0o755 },
    ...modules.map((module) => ({ kind: 'file' as const, path: `lib/modules/${module.name}.ko`, data: module.data })),
    { kind: 'file', path: 'init', data: Buffer.from(init), mode: 0o755 },
  ];
  await fs.mkdir(path.dirname(target), { recursive: true });
  const temp = `${target}.${process.pid}.tmp`;
  await fs.writeFile(temp, gzipSync(newcArchive(entries), { level: 1 }));
  await fs.rename(temp, target);
  return target;
}

async function findBusybox(): Promise<string> {
  for (const candidate of busyboxCandidates) {
    try {
      await fs.access(candidate);
      return candidate;
    } catch {
      // next
    }
  }
  throw new SnapshiftError('PROGRAM_MISSING', 'busybox is not installed (apt-get install busybox-static); the lab guest runs on it');
}
