import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { exec } from '../core/exec.ts';
import { SnapshiftError } from '../core/errors.ts';

/** Debian's meta package; it depends on exactly one versioned image package (the current kernel). */
const metaPackage = 'linux-image-cloud-amd64';

/**
 * Modules the guest needs for its disk, in insmod order. Debian's cloud kernel builds virtio_blk and the
 * virtio PCI transport as modules; one that is built in (modules.builtin) is simply skipped.
 */
const virtioModules = [
  'drivers/virtio/virtio_ring',
  'drivers/virtio/virtio',
  'drivers/virtio/virtio_pci_modern_dev',
  'drivers/virtio/virtio_pci_legacy_dev',
  'drivers/virtio/virtio_pci',
  'drivers/block/virtio_blk',
  // virtio-serial: the guest opens its guest-agent port, so libvirt connects to the agent channel (a libvirt
  // domain's agent counts as connected only once the guest side of the port is open: VSERPORT_CHANGE).
  'drivers/char/virtio_console',
];

/** Names the module set, so a cached kernel unpacked for another set is unpacked again beside it. */
const moduleSetKey = createHash('sha256').update(virtioModules.join('\n')).digest('hex').slice(0, 8);

/** A guest kernel unpacked in the cache: the bzImage and the virtio modules (uncompressed .ko). */
export interface GuestKernel {
  debianPackage: string;
  kernelVersion: string;
  vmlinuzPath: string;
  /** In insmod order; each file is `<dir>/<name>.ko`. */
  modules: Array<{ name: string; path: string }>;
  /** The module set it was unpacked for (`moduleSetKey`); a manifest of another set is not used. */
  moduleSet?: string;
  /** Set when this call downloaded it (for measurements); absent when it came from the cache. */
  downloadMs?: number;
}

/**
 * The guest kernel, from the cache or else downloaded once: `apt-get download` of the versioned package
 * the meta package depends on, `dpkg -x`, keep vmlinuz and the virtio modules (~10 MB), drop the rest.
 * The cache folder may be shared between labs (SNAPSHIFT_LAB_CACHE), so results are renamed into place.
 */
export async function ensureGuestKernel(cacheDir: string): Promise<GuestKernel> {
  const kernelDir = path.join(cacheDir, 'kernel');
  const manifestPath = path.join(kernelDir, 'guest-kernel.json');
  const cached = await readManifest(manifestPath);
  if (cached) return cached;

  const started = Date.now();
  const work = await fs.mkdtemp(path.join(await mkdirp(kernelDir), 'download-'));
  try {
    const debianPackage = await downloadImagePackage(work);
    const deb = (await fs.readdir(work)).find((name) => name.endsWith('.deb'));
    if (!deb) throw new SnapshiftError('LAB_KERNEL_DOWNLOAD', `apt-get download ${debianPackage} produced no .deb`);
    const tree = path.join(work, 'x');
    await exec('dpkg', ['-x', path.join(work, deb), tree], { timeoutMs: 300_000 });
    const [kernelVersion] = await fs.readdir(path.join(tree, 'lib', 'modules'));
    if (!kernelVersion) throw new SnapshiftError('LAB_KERNEL_DOWNLOAD', `${deb} holds no lib/modules/<version>`);
    const moduleRoot = path.join(tree, 'lib', 'modules', kernelVersion);
    const builtin = await fs.readFile(path.join(moduleRoot, 'modules.builtin'), 'utf8').catch(() => '');

    const staging = path.join(work, 'kernel');
    await fs.mkdir(path.join(staging, 'modules'), { recursive: true });
    await fs.copyFile(path.join(tree, 'boot', `vmlinuz-${kernelVersion}`), path.join(staging, 'vmlinuz'));
    const moduleNames: string[] = [];
    for (const modulePath of virtioModules) {
      const name = path.basename(modulePath);
      if (builtin.split('\n').some((line) => line.startsWith(`kernel/${modulePath}.ko`))) continue;
      await copyModule(path.join(moduleRoot, 'kernel', modulePath), path.join(staging, 'modules', `${name}.ko`));
      moduleNames.push(name);
    }
    // Beside, not over, a folder unpacked for another module set: a lab of other code may boot from it now.
    const finalDir = path.join(kernelDir, `${kernelVersion}-${moduleSetKey}`);
    await fs.rm(finalDir, { recursive: true, force: true });
    await fs.rename(staging, finalDir);
    const kernel: GuestKernel = {
      debianPackage,
      kernelVersion,
      moduleSet: moduleSetKey,
      vmlinuzPath: path.join(finalDir, 'vmlinuz'),
      modules: moduleNames.map((name) => ({ name, path: path.join(finalDir, 'modules', `${name}.ko`) })),
    };
    const temp = `${manifestPath}.${process.pid}.tmp`;
    await fs.writeFile(temp, `${JSON.stringify(kernel, null, 2)}\n`);
    await fs.rename(temp, manifestPath);
    return { ...kernel, downloadMs: Date.now() - started };
  } finally {
    await fs.rm(work, { recursive: true, force: true });
  }
}

/**
 * Resolves and downloads the versioned image package into `dir`. On a fresh machine apt's lists may be
 * missing, or stale after a kernel update (the old .deb is gone from the mirror): then `apt-get update`
 * once and try again.
 */
async function downloadImagePackage(dir: string): Promise<string> {
  const attempt = async (): Promise<string> => {
    const debianPackage = await resolveImagePackage();
    await exec('apt-get', ['download', '-q', debianPackage], { cwd: dir, timeoutMs: 600_000, code: 'LAB_KERNEL_DOWNLOAD' });
    return debianPackage;
  };
  try {
    return await attempt();
  } catch (error) {
    if (process.getuid?.() !== 0) throw error;
    await exec('apt-get', ['update', '-qq'], { timeoutMs: 600_000, code: 'LAB_KERNEL_DOWNLOAD' });
    return attempt();
  }
}

async function resolveImagePackage(): Promise<string> {
  const { stdout } = await exec('apt-cache', ['depends', metaPackage], { code: 'LAB_KERNEL_DOWNLOAD' });
  const match = /Depends:\s+(linux-image-\S+)/.exec(stdout);
  if (!match?.[1]) {
    throw new SnapshiftError('LAB_KERNEL_DOWNLOAD', `apt does not know ${metaPackage} (run "apt-get update" first; the lab's guest kernel comes from Debian's package)`);
  }
  return match[1];
}

/** Copies a module, decompressing .ko.xz / .ko.zst (newer Debian kernels compress them) with the host tools. */
async function copyModule(base: string, target: string): Promise<void> {
  for (const [suffix, decompress] of [['.ko', undefined], ['.ko.xz', 'xz'], ['.ko.zst', 'zstd']] as const) {
    const source = `${base}${suffix}`;
    try {
      await fs.access(source);
    } catch {
      continue;
    }
    if (!decompress) return fs.copyFile(source, target);
    const compressed = `${target}${suffix.slice(3)}`;
    await fs.copyFile(source, compressed);
    await exec(decompress, ['-d', '-q', '-f', compressed]);
    await fs.rm(compressed, { force: true });
    return;
  }
  throw new SnapshiftError('LAB_KERNEL_DOWNLOAD', `the kernel package has no module ${base}.ko (nor .ko.xz/.ko.zst)`);
}

async function readManifest(file: string): Promise<GuestKernel | undefined> {
  try {
    const kernel = JSON.parse(await fs.readFile(file, 'utf8')) as GuestKernel;
    if (kernel.moduleSet !== moduleSetKey) return undefined;
    await fs.access(kernel.vmlinuzPath);
    for (const module of kernel.modules) await fs.access(module.path);
    return kernel;
  } catch {
    return undefined;
  }
}

async function mkdirp(dir: string): Promise<string> {
  await fs.mkdir(dir, { recursive: true });
  return dir;
}
