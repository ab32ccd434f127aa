import { describe } from 'node:test';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { withCeph } from '../../src/lab/index.ts';
import { CephRbdStorage, parseRbdImagePath } from '../../src/storage/ceph-rbd/ceph-rbd-storage.ts';
import { describeStorageConformance, makeRawFile } from '../support/storage-conformance.ts';

const MiB = 1024 * 1024;
/** An RBD namespace (`pool/namespace/image`): the "deep path" of RBD. */
const namespace = 'tenant-acme_eu-west';

describe('storage conformance on the lab Ceph (single node, one pool)', () => {
  // One Ceph for the whole file: bringing it up is most of this file's time.
  const ceph = withCeph();
  let userSnapshots = 0;
  let vanishing = 0;
  let namespaceMade = false;

  /** QEMU's own name for the image (`json:{"driver":"rbd",…}`), as the image exporter and qemu-io open it. */
  function qemuName(imagePath: string): string {
    const image = parseRbdImagePath(imagePath);
    if (!image) throw new Error(`${imagePath} is not rbd:pool/image`);
    return `json:${JSON.stringify({ driver: 'rbd', pool: image.pool, ...(image.namespace ? { namespace: image.namespace } : {}), image: image.image, conf: ceph().confPath })}`;
  }

  /** `rbd:pool/image` → `pool/image`, as the rbd CLI names it. */
  function specOf(imagePath: string): string {
    return imagePath.slice('rbd:'.length);
  }

  async function ownIn(args: readonly string[], where: string): Promise<string[]> {
    const { stdout } = await ceph().rbd(['ls', '-l', '--format', 'json', ...args]);
    return (JSON.parse(stdout || '[]') as Array<{ image: string; snapshot?: string }>)
      .filter((entry) => entry.image.startsWith('snapshift-') || entry.snapshot?.startsWith('snapshift-'))
      .map((entry) => `${where}/${entry.image}${entry.snapshot ? `@${entry.snapshot}` : ''}`);
  }

  describeStorageConformance({
    name: 'ceph-rbd',
    system: () => new CephRbdStorage({ confPath: ceph().confPath }),
    async makeImage(name, sizeBytes, options = {}) {
      let spec = `${ceph().pool}/${name}`;
      if (options.deep) {
        if (!namespaceMade) await ceph().rbd(['namespace', 'create', '--pool', ceph().pool, '--namespace', namespace]);
        namespaceMade = true;
        spec = `${ceph().pool}/${namespace}/${name}`;
      }
      await ceph().rbd(['create', spec, '--size', `${Math.ceil(sizeBytes / MiB)}M`]);
      return `rbd:${spec}`;
    },
    async makeForeignImage(name, scratchDir) {
      const path = join(scratchDir, name);
      await makeRawFile(path, MiB);
      return path;
    },
    async writePattern(imagePath, offsetBytes, lengthBytes, byte) {
      // qemu-io exits non-zero when the write fails; the write is on the OSD when it returns.
      const raw = `json:${JSON.stringify({ driver: 'raw', file: JSON.parse(qemuName(imagePath).slice('json:'.length)) as unknown })}`;
      await exec('qemu-io', ['-c', `write -P 0x${byte.toString(16)} ${offsetBytes} ${lengthBytes}`, raw]);
    },
    readablePath: qemuName,
    async userSnapshot(imagePath) {
      const location = `${specOf(imagePath)}@users-own-${userSnapshots++}`;
      await ceph().rbd(['snap', 'create', '--no-progress', location]);
      return {
        location,
        exists: async () => {
          const { stdout } = await ceph().rbd(['snap', 'ls', '--format', 'json', specOf(imagePath)]);
          return (JSON.parse(stdout) as Array<{ name: string }>).some((snapshot) => `${specOf(imagePath)}@${snapshot.name}` === location);
        },
        remove: async () => void (await ceph().rbd(['snap', 'rm', '--no-progress', location])),
      };
    },
    async ownLeftovers() {
      const found = await ownIn(['--pool', ceph().pool], ceph().pool);
      if (namespaceMade) found.push(...(await ownIn(['--pool', ceph().pool, '--namespace', namespace], `${ceph().pool}/${namespace}`)));
      return found.sort();
    },
    async makeVanishingVolume() {
      const spec = `${ceph().pool}/vanishing-${vanishing++}`;
      await ceph().rbd(['create', spec, '--size', '1M']);
      const imagePath = `rbd:${spec}`;
      const volume = (await new CephRbdStorage({ confPath: ceph().confPath }).locate(imagePath))!;
      // Ceph refuses to remove an image with snapshots: its user purges them first, ours included.
      const vanish = async () => {
        await ceph().rbd(['snap', 'purge', '--no-progress', spec]);
        await ceph().rbd(['rm', '--no-progress', spec]);
      };
      return { volume, imagePath, name: spec, vanish };
    },
    imagesCutTogether:
      'each RBD image is its own volume with its own snapshot (rbd snap create per image): the VM snapshot holding the bases still is what makes several images one instant',
  });
});
