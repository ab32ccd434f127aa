import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { checkRepository, collectGarbage, initRepository, openRepository } from '../../src/repository/index.ts';
import { backup, md5, mixedDisk, restoreAll, seededBytes, tempDir } from './helpers.ts';

const chunk = 256 * 1024;
const writerScript = fileURLToPath(new URL('./fixtures/crash-writer.ts', import.meta.url));

/** Runs the writer child and SIGKILLs it when it prints `killAt` (or lets it finish). */
function runWriter(path: string, chunks: number, seed: number, killAt?: string): Promise<{ killed: boolean; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', writerScript, path, String(chunks), String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    let killed = false;
    child.stdout.on('data', (data: Buffer) => {
      output += data.toString();
      if (killAt !== undefined && !killed && output.split('\n').includes(killAt)) {
        killed = true;
        child.kill('SIGKILL');
      }
    });
    child.stderr.on('data', (data: Buffer) => (output += data.toString()));
    child.on('error', reject);
    child.on('exit', () => resolve({ killed, output }));
  });
}

test('a writer killed at several points leaves a repository that checks clean and restores every earlier point', async () => {
  await using dir = await tempDir();
  // Small packs, so a kill lands between sealed packs, inside a pack, and during commit.
  await initRepository(dir.path, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 1024 * 1024 });
  const earlierData = mixedDisk(10 * chunk + 999, chunk, 100);
  let earlierId: string;
  {
    await using repository = await openRepository(dir.path, { password: 'pw' });
    earlierId = (await backup(repository, 'steady', { vda: earlierData })).id;
  }
  for (const [seed, killAt] of [[1, 'chunk 1'], [2, 'chunk 17'], [3, 'committing'], [4, 'chunk 30']] as const) {
    const run = await runWriter(dir.path, 32, seed, killAt);
    assert.ok(run.killed, `writer reached "${killAt}": ${run.output}`);
    await using repository = await openRepository(dir.path, { password: 'pw' });
    const report = await checkRepository(repository, { readDataPercent: 100 });
    assert.deepEqual(report.problems, [], `check after kill at ${killAt}`);
    const points = await repository.listRestorePoints();
    assert.deepEqual(points.map((p) => p.vmName), ['steady'], 'the unfinished restore point is invisible');
    assert.equal(md5(await restoreAll(repository, earlierId, 'vda')), md5(earlierData));
  }
  // A writer left alone commits, and its data reads back; gc then sweeps what the killed ones left.
  const done = await runWriter(dir.path, 8, 9);
  assert.match(done.output, /committed [0-9a-f]{32}/);
  await using repository = await openRepository(dir.path, { password: 'pw' });
  await collectGarbage(repository, { safetyWindowMs: 0 });
  const after = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual(after.problems, []);
  assert.deepEqual(after.warnings, []);
  const crashy = (await repository.listRestorePoints('crashy'))[0]!;
  assert.equal(md5(await restoreAll(repository, crashy.id, 'vda')), md5(mixedDisk(8 * chunk, chunk, 9)));
  assert.equal(md5(await restoreAll(repository, earlierId, 'vda')), md5(earlierData));
});

test('two writers in one process: a restore point committed by one, deduplicated against packs of the other, survives a crash before the other wrote its index', async () => {
  await using dir = await tempDir();
  // One blob per pack: writer A seals packs at once, long before it would write an index file of its own.
  await initRepository(dir.path, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 1 });
  const earlierData = mixedDisk(6 * chunk + 77, chunk, 200);
  let earlierId: string;
  {
    await using repository = await openRepository(dir.path, { password: 'pw' });
    earlierId = (await backup(repository, 'steady', { vda: earlierData })).id;
  }
  const seed = 5;
  const child = await new Promise<{ signal: NodeJS.Signals | null; output: string }>((resolve, reject) => {
    const writers = spawn(process.execPath, ['--import', 'tsx', fileURLToPath(new URL('./fixtures/two-writers.ts', import.meta.url)), dir.path, String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    writers.stdout.on('data', (data: Buffer) => (output += data.toString()));
    writers.stderr.on('data', (data: Buffer) => (output += data.toString()));
    writers.on('error', reject);
    writers.on('exit', (_code, signal) => resolve({ signal, output }));
  });
  assert.equal(child.signal, 'SIGKILL', child.output);
  const committedId = /committed ([0-9a-f]{32})/.exec(child.output)?.[1];
  assert.ok(committedId, child.output);

  await using repository = await openRepository(dir.path, { password: 'pw' });
  const report = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual(report.problems, [], 'every chunk the committed manifest names is in an index file');
  assert.deepEqual((await repository.listRestorePoints()).map((p) => p.vmName).sort(), ['steady', 'vm-b']);
  const expected = Buffer.concat([seededBytes(Buffer.alloc(32, seed), 0, 6 * chunk), seededBytes(Buffer.alloc(32, seed), 1, 2 * chunk)]);
  assert.equal(md5(await restoreAll(repository, committedId, 'vda')), md5(expected));
  assert.equal(md5(await restoreAll(repository, earlierId, 'vda')), md5(earlierData));
  // gc keeps what vm-b needs and removes what the unfinished vm-a left.
  await collectGarbage(repository, { safetyWindowMs: 0 });
  const after = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual([after.problems, after.warnings], [[], []]);
  assert.equal(md5(await restoreAll(repository, committedId, 'vda')), md5(expected));
});
