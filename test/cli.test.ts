import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

test('snapshift --help lists the program and exits 0', async () => {
  const { stdout } = await run('bin/snapshift', ['--help']);
  assert.match(stdout, /Usage: snapshift/);
});

test('an unknown command is a usage error with exit status 64', async () => {
  await assert.rejects(run('bin/snapshift', ['no-such-command']), (error: { code?: number; stderr?: string }) => {
    assert.equal(error.code, 64);
    assert.match(error.stderr ?? '', /unknown command|too many arguments/);
    return true;
  });
});
