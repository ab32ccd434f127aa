import { test } from 'node:test';
import assert from 'node:assert/strict';
import { exec, start } from '../../src/core/exec.ts';

function withEnv(values: Record<string, string>, body: () => Promise<void>): Promise<void> {
  const saved = Object.fromEntries(Object.keys(values).map((name) => [name, process.env[name]]));
  Object.assign(process.env, values);
  return body().finally(() => {
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  });
}

const secrets = { SNAPSHIFT_PASSWORD: 'hunter2', SNAPSHIFT_NEW_PASSWORD: 'hunter3', CREDENTIALS_DIRECTORY: '/run/credentials/snapshift.service', SNAPSHIFT_TEST_VISIBLE: 'yes' };

test('a program run through exec does not see the repository password (or other secrets of ours)', async () => {
  await withEnv(secrets, async () => {
    const { stdout } = await exec('env', []);
    const names = stdout.split('\n').map((line) => line.split('=')[0]);
    assert.ok(names.includes('SNAPSHIFT_TEST_VISIBLE'), 'the rest of the environment is passed on');
    assert.ok(names.includes('PATH'));
    for (const secret of ['SNAPSHIFT_PASSWORD', 'SNAPSHIFT_NEW_PASSWORD', 'CREDENTIALS_DIRECTORY']) assert.ok(!names.includes(secret), `${secret} reached the child`);
    assert.doesNotMatch(stdout, /hunter[23]/);
    assert.equal(process.env.SNAPSHIFT_PASSWORD, 'hunter2', 'our own environment is untouched');
  });
});

test('a program started with start does not see them either, also when the caller passes its own env', async () => {
  await withEnv(secrets, async () => {
    for (const options of [{}, { env: { ...process.env, EXTRA: '1' } }]) {
      const child = start('env', [], options);
      let stdout = '';
      child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
      await new Promise((resolve) => child.once('close', resolve));
      assert.doesNotMatch(stdout, /hunter[23]|CREDENTIALS_DIRECTORY/);
      assert.match(stdout, /SNAPSHIFT_TEST_VISIBLE=yes/);
    }
  });
});
