// `hallmark manifest sign` and `hallmark manifest import` as a user runs them: node bin/hallmark.js
// against a temporary authority. Generated CSV and NDJSON lists are signed by the CLI (and the
// ECDSA signature checked by openssl as an independent verifier), then imported and listed; the
// real Microchip manifest goes through the same command.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createPublicKey, generateKeyPairSync } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createTestAuthority, type TestAuthority } from '../../helpers/authority.js';
import { openssl } from '../../pki/fixtures.js';
import { MCHP, ROOT_CA_002, SIGNER_5, csvText, deviceKey, makeIdentity, ndjsonText } from './fixtures.js';

const BIN = join(import.meta.dirname, '..', '..', '..', '..', 'bin', 'hallmark.js');

describe('hallmark manifest (CLI)', () => {
  let t: TestAuthority;
  const run = (args: string[], env: Record<string, string> = {}): { status: number; stdout: string; stderr: string } => {
    const r = spawnSync(process.execPath, [BIN, ...args, '--home', t.home], {
      env: { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '', ...env }, encoding: 'utf8',
    });
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  };
  const ok = (args: string[], env?: Record<string, string>): string => {
    const r = run(args, env);
    assert.equal(r.status, 0, `hallmark ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
    return r.stdout;
  };
  const newBatch = (): string => /b-[0-9a-f]{12}/.exec(ok(['batch', 'create', '--product', 'sensor', '--line', 'line-a', '--quota', '1000']))![0];
  const udidsOf = (batch: string): string[] =>
    (JSON.parse(ok(['device', 'list', '--batch', batch, '--limit', '1000', '--json'])) as { items: { udid: string }[] }).items.map((d) => d.udid);

  before(async () => {
    t = await createTestAuthority({ org: 'Manifest CLI Org' });
    ok(['product', 'create', 'sensor']);
    ok(['line', 'create', 'line-a', '--ca', 'issuing-1']);
  });
  after(async () => { await t?.cleanup(); });

  test('a CSV list signed with "manifest sign" (P-256) imports; openssl verifies the same signature', () => {
    const producer = makeIdentity('O=CLI Producer, CN=List Signer');
    const keyPem = join(t.dir, 'producer.key.pem');
    const certPem = join(t.dir, 'producer.pem');
    const pubPem = join(t.dir, 'producer.pub.pem');
    writeFileSync(keyPem, producer.privateKey.export({ type: 'pkcs8', format: 'pem' }));
    writeFileSync(certPem, producer.certPem);
    writeFileSync(pubPem, createPublicKey(producer.privateKey).export({ type: 'spki', format: 'pem' }));
    const keys = Array.from({ length: 50 }, () => deviceKey());
    const list = join(t.dir, 'devices.csv');
    writeFileSync(list, csvText(['udid', 'public_key', 'serial'], keys.map((k, i) => ({ udid: k.udid, public_key: k.spki.toString('base64'), serial: `CLI-${i}` }))));
    const signed = ok(['manifest', 'sign', list, '--key', keyPem]);
    assert.match(signed, /Signed .*devices\.csv \(sha256 [0-9a-f]{64}\) with ecdsa-p256-sha256: .*devices\.csv\.sig/);
    assert.match(openssl(['dgst', '-sha256', '-verify', pubPem, '-signature', `${list}.sig`, list]).stdout.toString(), /Verified OK/);

    const batch = newBatch();
    const report = JSON.parse(ok(['manifest', 'import', list, '--batch', batch, '--trust', certPem, '--json'])) as Record<string, unknown>;
    assert.equal(report.format, 'csv');
    assert.equal(report.registered, 50);
    assert.deepEqual(udidsOf(batch), keys.map((k) => k.udid).sort());
    // Again: nothing changes.
    assert.match(ok(['manifest', 'import', list, '--batch', batch, '--trust', certPem]), /50 entries, 0 registered, 50 unchanged, 0 re-registered, 0 invalid skipped/);
    // Into another batch: clones, one line on stderr, exit 1.
    const clone = run(['manifest', 'import', list, '--batch', newBatch(), '--trust', certPem]);
    assert.equal(clone.status, 1);
    assert.match(clone.stderr, /^hallmark manifest import: line 2 \(udid [0-9a-f]{64}\): .*refused as a possible clone; nothing was imported \[CLONE_DETECTED\]\n$/);
    // Changed after signing: refused before parsing.
    writeFileSync(list, readFileSync(list, 'utf8').replace('CLI-7', 'CLI-8'));
    const changed = run(['manifest', 'import', list, '--batch', newBatch(), '--trust', certPem]);
    assert.equal(changed.status, 1);
    assert.match(changed.stderr, /the detached signature does not verify over the file .* \[MANIFEST_INVALID\]/);
  });

  test('an NDJSON list signed with an encrypted Ed25519 key imports with --trust PUBLIC KEY; --skip-invalid reports the bad line', () => {
    const { privateKey, publicKey } = generateKeyPairSync('ed25519');
    const keyPem = join(t.dir, 'ed.key.pem');
    const pubPem = join(t.dir, 'ed.pub.pem');
    writeFileSync(keyPem, privateKey.export({ type: 'pkcs8', format: 'pem', cipher: 'aes-256-cbc', passphrase: 'list key pass' }));
    writeFileSync(pubPem, publicKey.export({ type: 'spki', format: 'pem' }));
    const keys = Array.from({ length: 20 }, () => deviceKey());
    const rows = keys.map((k, i) => ({ udid: k.udid, public_key: k.spki.toString('base64'), serial: `ND-${i}` }));
    rows[4] = { ...rows[4]!, udid: keys[5]!.udid }; // line 5: the UDID of another key
    const list = join(t.dir, 'devices.ndjson');
    writeFileSync(list, ndjsonText(rows));
    const sig = join(t.dir, 'devices.ndjson.signature');
    const noPass = run(['manifest', 'sign', list, '--key', keyPem, '--out', sig], { HALLMARK_PASSPHRASE: '' });
    assert.equal(noPass.status, 1);
    assert.match(noPass.stderr, /PASSPHRASE_REQUIRED/);
    assert.match(ok(['manifest', 'sign', list, '--key', keyPem, '--out', sig], { HALLMARK_MANIFEST_KEY_PASSPHRASE: 'list key pass' }), /with ed25519/);
    assert.equal(readFileSync(sig).length, 64);

    const batch = newBatch();
    const refused = run(['manifest', 'import', list, '--batch', batch, '--trust', pubPem, '--signature', sig]);
    assert.equal(refused.status, 1);
    assert.match(refused.stderr, new RegExp(`^hallmark manifest import: line 5 \\(udid ${keys[5]!.udid}\\): udid ${keys[5]!.udid} does not match the public key .*\\[MANIFEST_INVALID\\]\\n$`));
    assert.deepEqual(udidsOf(batch), []);
    const r = run(['manifest', 'import', list, '--batch', batch, '--trust', pubPem, '--signature', sig, '--format', 'ndjson', '--skip-invalid']);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, new RegExp(`skipped invalid line 5 \\(udid ${keys[5]!.udid}\\): udid .* does not match the public key`));
    assert.match(r.stdout, /20 entries, 19 registered, 0 unchanged, 0 re-registered, 1 invalid skipped/);
    assert.match(r.stdout, /signed by public key \(sha256 [0-9a-f]{64}\)/);
    assert.equal(udidsOf(batch).length, 19);
  });

  test('the real Microchip manifest through the CLI: refused without the vendor CA, imported with it, listed by uniqueId', () => {
    const file = join(MCHP, 'ECC608C-TNGTLSU-B.json');
    const batch = newBatch();
    const without = run(['manifest', 'import', file, '--batch', batch, '--trust', SIGNER_5]);
    assert.equal(without.status, 1);
    assert.match(without.stderr, /entry 1 \(uniqueId 0123f2408ea1fcf201\): birth certificate cannot be checked.*\[BIRTH_CERT_INVALID\]/);
    ok(['vendor', 'add', 'microchip', '--ca', ROOT_CA_002]);
    const out = ok(['manifest', 'import', file, '--batch', batch, '--trust', SIGNER_5]);
    assert.match(out, /\(microchip, sha256 1e4691f8604d8a1be3a39aebe1ffb4a75e22d6c69ab48f329d4b284a364b40d5\).*10 entries, 10 registered/);
    assert.match(out, /signed by O=Microchip Technology Inc, CN=Manifest Signer 005/);
    const ids = (JSON.parse(readFileSync(file, 'utf8')) as { header: { uniqueId: string } }[]).map((e) => e.header.uniqueId).sort();
    assert.deepEqual(udidsOf(batch), ids);
    const audit = ok(['audit', 'list', '--action', 'manifest.import', '--json']);
    assert.match(audit, /manifest\.import/);
  });

  test('usage: help, a missing --trust, a bad --format, a missing file', () => {
    assert.match(ok(['manifest', 'import', '--help']), /Usage: hallmark manifest import FILE --batch ID --trust SIGNER\.pem/);
    assert.match(ok(['manifest', 'sign', '--help']), /openssl dgst -sha256 -sign/);
    const noTrust = run(['manifest', 'import', 'x.csv', '--batch', 'b-000000000000']);
    assert.equal(noTrust.status, 1);
    assert.match(noTrust.stderr, /--trust/);
    const badFormat = run(['manifest', 'import', 'x.csv', '--batch', 'b', '--trust', SIGNER_5, '--format', 'xml']);
    assert.match(badFormat.stderr, /--format is one of microchip, csv, ndjson/);
    const missing = run(['manifest', 'import', join(t.dir, 'nope.json'), '--batch', newBatch(), '--trust', SIGNER_5]);
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /cannot read .*nope\.json: ENOENT \[BAD_REQUEST\]/);
  });
});
