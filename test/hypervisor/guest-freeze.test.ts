// Freeze/thaw around a point in time (src/hypervisor/guest-freeze.ts) and the guest agent client's recovery
// from a timed-out command, against hooks and a scripted agent socket: no VM, no qemu-ga. The adapters' own
// paths (a real qemu-ga refusing the freeze, then thawed) are in the hypervisor conformance suite.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SnapshiftError } from '../../src/core/errors.ts';
import { whileGuestFrozen } from '../../src/hypervisor/guest-freeze.ts';
import { GuestAgent } from '../../src/hypervisor/qemu/guest-agent.ts';

function hooks(behaviour: { freeze?: () => Promise<void>; thaw?: () => Promise<void> }) {
  const calls: string[] = [];
  return {
    calls,
    quiesce: {
      freeze: async () => {
        calls.push('freeze');
        await behaviour.freeze?.();
      },
      thaw: async () => {
        calls.push('thaw');
        await behaviour.thaw?.();
      },
    },
  };
}

describe('whileGuestFrozen: a thaw follows every freeze attempt', () => {
  test('a freeze that times out is followed by a thaw, and its error is the one thrown', async () => {
    const { calls, quiesce } = hooks({ freeze: () => Promise.reject(new SnapshiftError('QGA_TIMEOUT', 'the guest agent did not answer guest-fsfreeze-freeze within 60000 ms')) });
    let taken = false;
    await assert.rejects(whileGuestFrozen(quiesce, async () => void (taken = true)), { code: 'QGA_TIMEOUT', message: /did not answer guest-fsfreeze-freeze/ });
    assert.equal(taken, false, 'no point in time without the freeze');
    assert.deepEqual(calls, ['freeze', 'thaw']);
  });

  test("a refused freeze: the thaw answering 'not frozen' changes nothing", async () => {
    const { calls, quiesce } = hooks({
      freeze: () => Promise.reject(new SnapshiftError('QGA_COMMAND_FAILED', 'guest agent: guest-fsfreeze-freeze failed: Command guest-fsfreeze-freeze has been disabled')),
      thaw: () => Promise.reject(new SnapshiftError('QGA_COMMAND_FAILED', 'guest agent: guest-fsfreeze-thaw failed: fsfreeze is not frozen')),
    });
    await assert.rejects(whileGuestFrozen(quiesce, async () => undefined), (error: SnapshiftError) => {
      assert.equal(error.code, 'QGA_COMMAND_FAILED');
      assert.equal(error.message, 'guest agent: guest-fsfreeze-freeze failed: Command guest-fsfreeze-freeze has been disabled');
      return true;
    });
    assert.deepEqual(calls, ['freeze', 'thaw']);
  });

  test('a failed freeze whose thaw fails too: both are in the error, the freeze\'s code kept', async () => {
    const { quiesce } = hooks({
      freeze: () => Promise.reject(new SnapshiftError('QGA_COMMAND_FAILED', 'guest agent: guest-fsfreeze-freeze failed: failed to freeze /data: Device or resource busy')),
      thaw: () => Promise.reject(new SnapshiftError('QGA_DISCONNECTED', 'the guest agent channel closed')),
    });
    await assert.rejects(whileGuestFrozen(quiesce, async () => undefined), { code: 'QGA_COMMAND_FAILED', message: /failed to freeze \/data.*thawing the guest's file systems afterwards failed too \(the guest agent channel closed\)/ });
  });

  test('the point in time failing while frozen: thawed, its error thrown; a thaw failing after success fails the point in time', async () => {
    const failing = hooks({});
    await assert.rejects(whileGuestFrozen(failing.quiesce, () => Promise.reject(new Error('transaction refused'))), /^Error: transaction refused$/);
    assert.deepEqual(failing.calls, ['freeze', 'thaw']);
    const stuck = hooks({ thaw: () => Promise.reject(new Error('agent gone')) });
    await assert.rejects(whileGuestFrozen(stuck.quiesce, async () => 'taken'), { code: 'QUIESCE_THAW_FAILED', message: /thawing the guest's file systems failed \(agent gone\)/ });
    assert.equal(await whileGuestFrozen(undefined, async () => 'taken'), 'taken', 'no quiescing: just the point in time');
  });
});

describe('the guest agent client after a timed-out command', () => {
  test("syncs again before the next command, so a late answer is never taken for the thaw's", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qga-fake-'));
    const socketPath = join(dir, 'qga.sock');
    const seen: string[] = [];
    // A scripted qemu-ga: one command at a time, in order, as qemu-ga runs them; the freeze takes 300 ms, past
    // the client's timeout, and its answer comes before the next command's.
    const server = createServer((socket) => {
      let buffer = '';
      let answered = Promise.resolve();
      const answer = (delayMs: number, reply: Buffer) => {
        answered = answered.then(() => new Promise((resolve) => setTimeout(resolve, delayMs))).then(() => void socket.write(reply));
      };
      socket.on('data', (bytes: Buffer) => {
        buffer += bytes.toString();
        for (let newline = buffer.indexOf('\n'); newline >= 0; newline = buffer.indexOf('\n')) {
          const request = JSON.parse(buffer.slice(0, newline)) as { execute: string; arguments?: { id?: number } };
          buffer = buffer.slice(newline + 1);
          seen.push(request.execute);
          // guest-sync-delimited: 0xff before the answer.
          if (request.execute === 'guest-sync-delimited') answer(0, Buffer.concat([Buffer.from([0xff]), Buffer.from(`${JSON.stringify({ return: request.arguments!.id })}\n`)]));
          else if (request.execute === 'guest-fsfreeze-freeze') answer(300, Buffer.from('{"return": 101}\n'));
          else if (request.execute === 'guest-fsfreeze-thaw') answer(10, Buffer.from('{"return": 2}\n'));
        }
      });
    });
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
    try {
      await using agent = await GuestAgent.connect(socketPath);
      await assert.rejects(agent.execute('guest-fsfreeze-freeze', undefined, 100), { code: 'QGA_TIMEOUT' });
      assert.equal(await agent.execute<number>('guest-fsfreeze-thaw', undefined, 2_000), 2, "the thaw's own answer, not the freeze's late one");
      assert.deepEqual(seen, ['guest-sync-delimited', 'guest-fsfreeze-freeze', 'guest-sync-delimited', 'guest-fsfreeze-thaw']);
    } finally {
      await new Promise((resolve) => server.close(resolve));
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
