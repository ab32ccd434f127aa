import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before } from 'node:test';
import { LabCeph, type CephUpOptions } from './ceph.ts';

/**
 * For a test file or describe block: brings single-node Ceph up in `before` (in a fresh temp lab folder
 * unless `dir` is given) and always takes it down in `after`, even when a test or `before` itself failed.
 *
 *   const ceph = withCeph();
 *   test('…', async () => { await ceph().rbd(['create', 'rbd/vm1', '--size', '64M']); … });
 */
export function withCeph(options: CephUpOptions = {}): () => LabCeph {
  let ceph: LabCeph | undefined;
  let dir: string | undefined;
  before(async () => {
    dir = options.dir ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'snapshift-ceph-')));
    ceph = await LabCeph.up({ ...options, dir });
  });
  after(async () => {
    if (!dir) return;
    await LabCeph.down(dir);
    if (options.dir === undefined) await fs.rm(dir, { recursive: true, force: true });
  });
  return () => {
    if (!ceph) throw new Error('Ceph is not up (withCeph must be called at the top of a test file or describe block)');
    return ceph;
  };
}
