// Every fault point of the repository's paths (src/core/fault-points.ts): a real operation in a child process
// (bin/snapshift, or test/repository/fixtures/crash-writer.ts for a backup, which needs no VM) is SIGKILLed
// there; then the repository must check clean with --read-data (warnings only for what gc removes, counted
// exactly), every restore point committed before must restore bit-exact, nothing of ours may lie outside
// tmp/ except a stale lock (restore: its own .snapshift-partial file), and the next run must succeed.
import { before, after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { cp, mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FaultPoint } from '../../src/core/fault-points.ts';
import { checkRepository, collectGarbage, forgetRestorePoints, initRepository, openRepository, type CheckReport } from '../../src/repository/index.ts';
import { md5File, runCli } from '../support/workspace.ts';
import { backup, md5, mixedDisk, restoreAll, seededBytes } from './helpers.ts';

const chunk = 256 * 1024;
const env = { SNAPSHIFT_PASSWORD: 'pw' };
const writerScript = fileURLToPath(new URL('./fixtures/crash-writer.ts', import.meta.url));
const crashyChunks = 12;

let root: string;
const template = () => join(root, 'template');
/** The restore points of the template repository, oldest first, with their data. */
const steady: Array<{ id: string; data: Buffer }> = [];

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'snapshift-fault-points-'));
  // Half of each disk is shared by all three points, half is their own: after forgetting two, gc has whole
  // packs to delete and packs to repack.
  await initRepository(template(), { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 512 * 1024 });
  await using repository = await openRepository(template(), { password: 'pw' });
  for (let i = 0; i < 3; i++) {
    const data = Buffer.concat([seededBytes(Buffer.alloc(32, 40), 0, 4 * chunk), seededBytes(Buffer.alloc(32, 41), i, 4 * chunk + 999)]);
    steady.push({ id: (await backup(repository, 'steady', { vda: data })).id, data });
  }
});
after(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  output: string;
}

/** Runs a child; with `point`, SNAPSHIFT_FAULT names it, else the child runs without any fault armed. */
function runChild(command: string, args: string[], point: FaultPoint | undefined, extraEnv: Record<string, string> = {}): Promise<ChildResult> {
  const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env, ...extraEnv };
  delete childEnv['SNAPSHIFT_FAULT'];
  if (point) childEnv['SNAPSHIFT_FAULT'] = point;
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (data: Buffer) => (output += data.toString()));
    child.stderr.on('data', (data: Buffer) => (output += data.toString()));
    child.on('error', reject);
    child.on('exit', (code, signal) => resolve({ code, signal, output }));
  });
}

const runWriter = (repo: string, seed: number, point: FaultPoint) => runChild(process.execPath, ['--import', 'tsx', writerScript, repo, String(crashyChunks), String(seed)], point);
const runCliAt = (args: string[], point: FaultPoint, extraEnv: Record<string, string> = {}) => runChild('bin/snapshift', args, point, extraEnv);

/** `snapshift check --read-data --json`, run as a user would (exit 1 with warnings, 2 with errors). */
async function cliCheck(repo: string): Promise<CheckReport> {
  const { status, stdout, stderr } = await runCli(['check', '--repo', repo, '--read-data', '--json'], env);
  assert.ok(status === 0 || status === 1, `check exit status ${status}: ${stderr}`);
  return JSON.parse(stdout) as CheckReport;
}

/** Every file of the repository, relative; anything not named as docs/FORMAT.md § Layout says fails. */
async function strayFiles(repo: string): Promise<{ stray: string[]; tmp: string[]; locks: string[]; packs: string[]; indexFiles: string[] }> {
  const result = { stray: [] as string[], tmp: [] as string[], locks: [] as string[], packs: [] as string[], indexFiles: [] as string[] };
  for (const entry of await readdir(repo, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const name = join(entry.parentPath ?? entry.path, entry.name).slice(repo.length + 1);
    if (name.startsWith('tmp/')) result.tmp.push(name);
    else if (/^locks\/[0-9a-f]{32}\.json$/.test(name)) result.locks.push(name);
    else if (/^data\/([0-9a-f]{2})\/\1[0-9a-f]{62}$/.test(name)) result.packs.push(name);
    else if (/^index\/[0-9a-f]{64}$/.test(name)) result.indexFiles.push(name);
    else if (!/^(config|keys\/[0-9a-f]{16}\.json|manifests\/[0-9a-f]{32})$/.test(name)) result.stray.push(name);
  }
  return result;
}

/** What a killed operation may leave, per kind of warning; everything else must be absent. */
interface Leftovers {
  unindexedPacks: number;
  tempFiles: number;
}

async function assertRecoverable(repo: string, killed: ChildResult, leftovers: Leftovers, committed: Array<{ id: string; data: Buffer }>, absent: string[] = []): Promise<void> {
  assert.equal(killed.signal, 'SIGKILL', `killed at its fault point: ${killed.output}`);
  const files = await strayFiles(repo);
  assert.deepEqual(files.stray, [], 'nothing of ours outside tmp/ but the format names');
  assert.equal(files.tmp.length, leftovers.tempFiles, `temp files: ${files.tmp.join(', ')}`);
  assert.ok(files.locks.length <= 1, 'at most the killed process\'s own (stale) lock');

  const report = await cliCheck(repo);
  assert.deepEqual(report.problems, [], 'check --read-data finds no error');
  const expected = [
    ...Array.from({ length: leftovers.unindexedPacks }, () => 'unindexed pack'),
    ...(leftovers.tempFiles > 0 ? [`${leftovers.tempFiles} temp file(s)`] : []),
  ];
  const found = report.warnings.map((warning) => {
    if (/^pack data\/[0-9a-f]{2}\/[0-9a-f]{64} is in no index \(left by an interrupted backup; gc removes it\)$/.test(warning)) return 'unindexed pack';
    const temp = /^(\d+) temporary file\(s\) in tmp\/ \(left by interrupted writes; the next backup on this host or gc removes them\)$/.exec(warning);
    return temp ? `${temp[1]} temp file(s)` : warning;
  });
  assert.deepEqual(found.sort(), expected.sort(), 'warnings only for what gc removes');

  await using repository = await openRepository(repo, { password: 'pw' });
  const ids = (await repository.listRestorePoints()).map((point) => point.id);
  for (const point of committed) assert.equal(md5(await restoreAll(repository, point.id, 'vda')), md5(point.data), `restore point ${point.id} restores bit-exact`);
  for (const id of absent) assert.ok(!ids.includes(id), `restore point ${id} is gone`);
}

/** The next runs succeed: a backup, then gc; after them the repository is clean without a warning. */
async function assertNextRunsSucceed(repo: string, committed: Array<{ id: string; data: Buffer }>): Promise<void> {
  await using repository = await openRepository(repo, { password: 'pw' });
  const data = mixedDisk(6 * chunk + 5, chunk, 77);
  const next = await backup(repository, 'next', { vda: data });
  await collectGarbage(repository, { safetyWindowMs: 0 });
  const report = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual([report.problems, report.warnings], [[], []], 'clean after the next backup and gc');
  for (const point of [...committed, { id: next.id, data }]) assert.equal(md5(await restoreAll(repository, point.id, 'vda')), md5(point.data), `restore point ${point.id} after gc`);
  const files = await strayFiles(repo);
  assert.deepEqual([files.stray, files.tmp, files.locks], [[], [], []], 'no temp file, no lock left');
}

async function freshRepository(name: string): Promise<string> {
  const repo = join(root, name);
  await cp(template(), repo, { recursive: true });
  return repo;
}

const crashyData = (seed: number) => mixedDisk(crashyChunks * chunk, chunk, seed);

// ---- backup (the repository's side): fixture writer, 12 chunks into packs of 512 KiB.

test('repo.after-pack-write: the first pack is durable but in no index; gc removes it', async () => {
  const repo = await freshRepository('after-pack-write');
  const killed = await runWriter(repo, 1, 'repo.after-pack-write');
  // The next pack may be filling in tmp/ when the first one is sealed.
  const tempFiles = (await strayFiles(repo)).tmp.length;
  assert.ok(tempFiles <= 1);
  await assertRecoverable(repo, killed, { unindexedPacks: 1, tempFiles }, steady);
  {
    await using repository = await openRepository(repo, { password: 'pw' });
    assert.deepEqual(await repository.listRestorePoints('crashy'), [], 'no restore point of the killed writer');
  }
  await assertNextRunsSucceed(repo, steady);
});

test('repo.after-last-pack: every pack of the writer is durable, none indexed; gc removes them', async () => {
  const repo = await freshRepository('after-last-pack');
  const packsBefore = (await strayFiles(repo)).packs.length;
  const killed = await runWriter(repo, 2, 'repo.after-last-pack');
  const newPacks = (await strayFiles(repo)).packs.length - packsBefore;
  assert.ok(newPacks >= 2, `${newPacks} new packs`);
  await assertRecoverable(repo, killed, { unindexedPacks: newPacks, tempFiles: 0 }, steady);
  await assertNextRunsSucceed(repo, steady);
});

test('repo.after-index-write: the packs are indexed but no manifest names them; check is clean, gc deletes them', async () => {
  const repo = await freshRepository('after-index-write');
  const packsBefore = (await strayFiles(repo)).packs.length;
  const killed = await runWriter(repo, 3, 'repo.after-index-write');
  await assertRecoverable(repo, killed, { unindexedPacks: 0, tempFiles: 0 }, steady);
  const newPacks = (await strayFiles(repo)).packs.length - packsBefore;
  {
    await using repository = await openRepository(repo, { password: 'pw' });
    assert.equal((await collectGarbage(repository, { safetyWindowMs: 0 })).packsDeleted, newPacks, 'gc deletes exactly the unreferenced packs');
  }
  await assertNextRunsSucceed(repo, steady);
});

test('repo.before-manifest-rename: the manifest is complete in tmp/ only; the restore point does not exist', async () => {
  const repo = await freshRepository('before-manifest-rename');
  const killed = await runWriter(repo, 4, 'repo.before-manifest-rename');
  await assertRecoverable(repo, killed, { unindexedPacks: 0, tempFiles: 1 }, steady);
  {
    await using repository = await openRepository(repo, { password: 'pw' });
    assert.deepEqual(await repository.listRestorePoints('crashy'), []);
  }
  await assertNextRunsSucceed(repo, steady);
});

test('repo.after-manifest-rename: the restore point is committed and restores bit-exact', async () => {
  const repo = await freshRepository('after-manifest-rename');
  const killed = await runWriter(repo, 5, 'repo.after-manifest-rename');
  let crashy: { id: string; data: Buffer };
  {
    await using repository = await openRepository(repo, { password: 'pw' });
    const points = await repository.listRestorePoints('crashy');
    assert.equal(points.length, 1);
    crashy = { id: points[0]!.id, data: crashyData(5) };
  }
  await assertRecoverable(repo, killed, { unindexedPacks: 0, tempFiles: 0 }, [...steady, crashy]);
  await assertNextRunsSucceed(repo, [...steady, crashy]);
});

// ---- forget and gc, through the CLI.

test('retention.mid-forget: one of two restore points is forgotten; forget again finishes the job', async () => {
  const repo = await freshRepository('mid-forget');
  const killed = await runCliAt(['forget', '--repo', repo, '--keep-last', '1', '--vm', 'steady'], 'retention.mid-forget');
  // Newest first: the middle point goes first, the oldest one was not reached.
  const [oldest, middle, newest] = steady as [(typeof steady)[0], (typeof steady)[0], (typeof steady)[0]];
  await assertRecoverable(repo, killed, { unindexedPacks: 0, tempFiles: 0 }, [oldest, newest], [middle.id]);
  {
    await using repository = await openRepository(repo, { password: 'pw' });
    const decisions = await forgetRestorePoints(repository, { keepLast: 1 }, { vmName: 'steady' });
    assert.deepEqual(decisions.filter((d) => !d.keep).map((d) => d.point.id), [oldest.id]);
  }
  await assertNextRunsSucceed(repo, [newest]);
});

/** A repository where the two older points are forgotten: gc has packs to delete and to repack. */
async function repositoryWithGarbage(name: string): Promise<{ repo: string; packsToDelete: number }> {
  const repo = await freshRepository(name);
  await using repository = await openRepository(repo, { password: 'pw' });
  await forgetRestorePoints(repository, { keepLast: 1 }, { vmName: 'steady' });
  const dryRun = await collectGarbage(repository, { safetyWindowMs: 0, dryRun: true });
  return { repo, packsToDelete: dryRun.packsDeleted + dryRun.packsRepacked };
}

test('gc.after-new-index: old and new index files overlap, which is valid; the next gc finishes', async () => {
  const { repo } = await repositoryWithGarbage('gc-after-new-index');
  const indexBefore = (await strayFiles(repo)).indexFiles.length;
  const killed = await runCliAt(['gc', '--repo', repo, '--safety-window', '0'], 'gc.after-new-index');
  await assertRecoverable(repo, killed, { unindexedPacks: 0, tempFiles: 0 }, [steady[2]!], [steady[0]!.id, steady[1]!.id]);
  assert.ok((await strayFiles(repo)).indexFiles.length > indexBefore, 'new index files were written, no old one removed');
  await assertNextRunsSucceed(repo, [steady[2]!]);
});

test('gc.mid-sweep: the packs gc had yet to delete are in no index; the next gc removes them', async () => {
  const { repo, packsToDelete } = await repositoryWithGarbage('gc-mid-sweep');
  assert.ok(packsToDelete >= 2, `${packsToDelete} packs to delete`);
  const killed = await runCliAt(['gc', '--repo', repo, '--safety-window', '0'], 'gc.mid-sweep');
  await assertRecoverable(repo, killed, { unindexedPacks: packsToDelete - 1, tempFiles: 0 }, [steady[2]!], [steady[0]!.id, steady[1]!.id]);
  {
    await using repository = await openRepository(repo, { password: 'pw' });
    assert.equal((await collectGarbage(repository, { safetyWindowMs: 0 })).unindexedDeleted, packsToDelete - 1);
  }
  await assertNextRunsSucceed(repo, [steady[2]!]);
});

// ---- restore, through the CLI: the repository is untouched; the partial file is the restore's own debris.

for (const point of ['restore.mid-copy', 'restore.before-rename'] as const) {
  test(`${point}: only <target>.snapshift-partial is left (never the target); the next restore replaces it`, async () => {
    const repo = await freshRepository(point);
    const home = join(root, `${point}-home`);
    const out = join(root, `${point}-out`);
    await mkdir(home);
    await mkdir(out);
    const target = join(out, 'vda.raw');
    const args = ['restore', 'steady', '--repo', repo, '--point', steady[2]!.id, '--to', target];
    const killed = await runCliAt(args, point, { SNAPSHIFT_HOME: home });
    await assertRecoverable(repo, killed, { unindexedPacks: 0, tempFiles: 0 }, steady);
    assert.deepEqual(await readdir(out), ['vda.raw.snapshift-partial'], 'a SIGKILL cannot remove it; it never carries the target name');

    const again = await runChild('bin/snapshift', args, undefined, { SNAPSHIFT_HOME: home });
    assert.equal(again.code, 0, again.output);
    assert.deepEqual(await readdir(out), ['vda.raw']);
    assert.equal(await md5File(target), md5(steady[2]!.data));
    await assertNextRunsSucceed(repo, steady);
  });
}
