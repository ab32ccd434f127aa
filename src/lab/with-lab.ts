import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before } from 'node:test';
import { Lab, type LabUpOptions, type LabZfs } from './lab.ts';

/** The part of node:test's TestContext this helper needs (t.after registers a hook that runs even on failure). */
export interface AfterHookOwner {
  after(fn: () => Promise<void> | void): void;
}

export interface TestLabOptions extends Omit<LabUpOptions, 'dir'> {
  /** Lab folder; default a fresh temp folder (removed on teardown). */
  dir?: string;
}

/** Default for tests: small datastores (sparse anyway), so mkfs and teardown stay fast. */
const testDatastoreSizeBytes = 1024 ** 3;

/**
 * Tests share one guest-kernel cache (unless SNAPSHIFT_LAB_CACHE says otherwise), so the kernel is
 * downloaded once per machine, not once per lab. Child processes (CLI runs) inherit it through the env.
 */
export function useSharedTestCache(): string {
  process.env['SNAPSHIFT_LAB_CACHE'] ??= path.join(os.tmpdir(), 'snapshift-lab-cache');
  return process.env['SNAPSHIFT_LAB_CACHE'];
}

/**
 * For a test file or describe block: brings a lab up in `before` and always takes it down in `after`,
 * even when a test failed or `before` itself failed half-way. Returns a getter for the lab.
 *
 *   const lab = withLab();
 *   test('…', async () => { const vm = await lab().startVm('vm1'); … });
 */
export function withLab(options: TestLabOptions = {}): () => Lab {
  let lab: Lab | undefined;
  let dir: string | undefined;
  before(async () => {
    useSharedTestCache();
    dir = options.dir ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'snapshift-lab-')));
    lab = await Lab.up({ datastoreSizeBytes: testDatastoreSizeBytes, ...options, dir });
  });
  after(async () => {
    if (dir) await tearDown(dir, options.dir === undefined);
  });
  return () => {
    if (!lab) throw new Error('the lab is not up (withLab must be called at the top of a test file or describe block)');
    return lab;
  };
}

/**
 * Like `withLab`, with the lab's ZFS datastore too (zfs-fuse, a pool on a sparse file); the teardown in
 * `after` destroys the pool and ends zfs-fuse if this lab started it, even when a test or `before` failed.
 *
 *   const zfs = withZfs();
 *   test('…', async () => { const disk = join(zfs().zfs.vmDisksDir, 'vm1.qcow2'); … });
 */
export function withZfs(options: Omit<TestLabOptions, 'zfs'> = {}): () => { lab: Lab; zfs: LabZfs } {
  const lab = withLab({ ...options, zfs: true });
  let zfs: LabZfs | undefined;
  before(async () => {
    zfs = await lab().zfs();
  });
  return () => {
    if (!zfs) throw new Error('the ZFS lab is not up (withZfs must be called at the top of a test file or describe block)');
    return { lab: lab(), zfs };
  };
}

/** For one test: brings a lab up now and registers its teardown with `t.after` (runs even on failure). */
export async function labFor(t: AfterHookOwner, options: TestLabOptions = {}): Promise<Lab> {
  useSharedTestCache();
  const dir = options.dir ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'snapshift-lab-')));
  t.after(() => tearDown(dir, options.dir === undefined));
  return Lab.up({ datastoreSizeBytes: testDatastoreSizeBytes, ...options, dir });
}

/** Lab.down from the state file (works even if up failed half-way), then the temp folder if we made it. */
async function tearDown(dir: string, removeDir: boolean): Promise<void> {
  await Lab.down(dir);
  // Lab.down refuses to go past a mount it could not remove, so this rm never reaches into a datastore.
  if (removeDir) await fs.rm(dir, { recursive: true, force: true });
}
