// Key pairs from DER templates (src/pki/raw-keys.ts) are the keys node:crypto and openssl read back:
// the public key derived from the PKCS#8 is the SPKI given, for every key (including scalars with
// leading zero bytes, about one in 256), and openssl parses both encodings.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createPrivateKey, createPublicKey } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { p256KeyPair, x25519KeyPair } from '../../src/pki/raw-keys.js';
import { tempDirFor } from '../helpers/tmp.js';

const publicOf = (pkcs8: Buffer): Buffer => createPublicKey(createPrivateKey({ key: pkcs8, format: 'der', type: 'pkcs8' })).export({ type: 'spki', format: 'der' });

test('P-256: 3,000 key pairs, each PKCS#8 yields its SPKI; all distinct', () => {
  const seen = new Set<string>();
  for (let i = 0; i < 3000; i++) {
    const k = p256KeyPair();
    assert.ok(publicOf(k.pkcs8).equals(k.spki), `key ${i}`);
    assert.equal(createPublicKey({ key: k.spki, format: 'der', type: 'spki' }).asymmetricKeyDetails?.namedCurve, 'prime256v1');
    seen.add(k.spki.toString('hex'));
  }
  assert.equal(seen.size, 3000);
});

test('X25519: each PKCS#8 yields its SPKI; all distinct', async () => {
  const keys = await Promise.all(Array.from({ length: 500 }, () => x25519KeyPair()));
  for (const k of keys) {
    assert.ok(publicOf(k.pkcs8).equals(k.spki));
    assert.equal(createPublicKey({ key: k.spki, format: 'der', type: 'spki' }).asymmetricKeyType, 'x25519');
  }
  assert.equal(new Set(keys.map((k) => k.spki.toString('hex'))).size, 500);
});

test('openssl reads both encodings and derives the same public key', async (t) => {
  const dir = await tempDirFor(t);
  for (const [name, k] of [['p256', p256KeyPair()], ['x25519', await x25519KeyPair()]] as const) {
    writeFileSync(join(dir, `${name}.p8`), k.pkcs8);
    writeFileSync(join(dir, `${name}.spki`), k.spki);
    const fromPrivate = execFileSync('openssl', ['pkey', '-inform', 'DER', '-in', join(dir, `${name}.p8`), '-pubout', '-outform', 'DER']);
    const fromPublic = execFileSync('openssl', ['pkey', '-pubin', '-inform', 'DER', '-in', join(dir, `${name}.spki`), '-outform', 'DER']);
    assert.ok(fromPrivate.equals(k.spki) && fromPublic.equals(k.spki), name);
  }
});
