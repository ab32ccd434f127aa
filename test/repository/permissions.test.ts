import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { addKey, initRepository, openRepository } from '../../src/repository/index.ts';
import { backup, mixedDisk, tempDir } from './helpers.ts';

/** Every file and folder under `root` (root included) with its permission bits. */
async function modes(root: string): Promise<Array<{ path: string; directory: boolean; mode: number }>> {
  const result = [{ path: root, directory: true, mode: (await stat(root)).mode & 0o777 }];
  for (const entry of await readdir(root, { withFileTypes: true, recursive: true })) {
    const path = join(entry.parentPath, entry.name);
    result.push({ path, directory: entry.isDirectory(), mode: (await stat(path)).mode & 0o777 });
  }
  return result;
}

test('a repository keeps its key slots, config and data to its owner: files 0600, folders 0700, whatever the umask', async () => {
  await using dir = await tempDir();
  const location = join(dir.path, 'repo');
  const umask = process.umask(0); // the loosest umask: modes must come from the code, not the environment
  try {
    await initRepository(location, { encryption: true, password: 'first', chunkSizeBytes: 256 * 1024 });
    await using repository = await openRepository(location, { password: 'first' });
    await addKey(repository, 'second');
    await backup(repository, 'vm1', { disk0: mixedDisk(2 * 1024 * 1024, 256 * 1024, 1) });
  } finally {
    process.umask(umask);
  }
  const entries = await modes(location);
  const relative = (path: string) => path.slice(location.length) || '/';
  assert.ok(entries.some((entry) => relative(entry.path) === '/config'));
  assert.equal(entries.filter((entry) => relative(entry.path).startsWith('/keys/')).length, 2, 'two key slots');
  assert.ok(entries.some((entry) => relative(entry.path).startsWith('/data/') && !entry.directory), 'packs were written');
  assert.ok(entries.some((entry) => relative(entry.path).startsWith('/data/') && entry.directory), 'pack subfolders were made');
  const wrong = entries.filter((entry) => entry.mode !== (entry.directory ? 0o700 : 0o600)).map((entry) => `${relative(entry.path)} ${entry.mode.toString(8)}`);
  assert.deepEqual(wrong, []);
});
