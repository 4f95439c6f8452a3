// The openssl + SoftHSM2 bridge the EST interop tests build on: a device key generated inside a
// SoftHSM2 token, used by the real `openssl` (CSR, self-signed certificate, s_client) and `curl`
// (TLS client authentication) through the OpenSSL pkcs11 engine, checked independently by
// openssl, @peculiar/x509 and Node's TLS stack.

import 'reflect-metadata';
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { createPublicKey, X509Certificate } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Pkcs10CertificateRequest } from '@peculiar/x509';
import {
  curlPkcs11Skip,
  curlPkcs11Unavailable,
  makeCsrWithTokenKey,
  makeSelfSignedCertWithTokenKey,
  opensslPkcs11Skip,
  requireOpensslPkcs11,
  softHsmOpensslKey,
  type SoftHsmOpensslKey,
} from '../helpers/openssl-pkcs11.js';

const execFileAsync = promisify(execFile);
const CHALLENGE_PASSWORD_OID = '1.2.840.113549.1.9.7';

interface Run { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }

/** Runs a command without blocking the event loop (a server in this process must answer it); stdin is /dev/null. */
function runAsync(command: string, args: readonly string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill(), 30_000);
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('close', (code, signal) => { clearTimeout(timer); resolve({ code, signal, stdout, stderr }); });
  });
}

function spkiOfPem(pem: string): Buffer {
  return createPublicKey(pem).export({ format: 'der', type: 'spki' });
}

describe('openssl and curl with a key held in SoftHSM2 (OpenSSL pkcs11 engine)', { skip: opensslPkcs11Skip() }, () => {
  let key: SoftHsmOpensslKey;

  before(async () => {
    requireOpensslPkcs11();
    key = await softHsmOpensslKey({ keyLabel: 'device key 1' });
  });

  after(async () => {
    await key?.cleanup();
  });

  test('the key pair was generated in the token: P-256, sensitive, never extractable', async () => {
    assert.equal(createPublicKey({ key: key.publicKeySpkiDer, format: 'der', type: 'spki' }).asymmetricKeyDetails?.namedCurve, 'prime256v1');
    const { stdout } = await execFileAsync('pkcs11-tool', ['--module', key.token.module, '--token-label', key.token.token, '--login', '--pin', key.token.pin, '--list-objects', '--type', 'privkey'], { env: key.env });
    assert.match(stdout, /label:\s+device key 1/);
    assert.match(stdout, /Access:\s+.*sensitive/);
    assert.match(stdout, /never extractable/);
    // The engine sees the same public key as pkcs11-tool did.
    const engineView = await execFileAsync('openssl', ['pkey', ...key.opensslArgs.slice(0, 2), '-inform', 'engine', '-pubin', '-in', key.publicKeyUri, '-pubout'], { env: key.env });
    assert.deepEqual(spkiOfPem(engineView.stdout), key.publicKeySpkiDer);
  });

  test('openssl req -new with the token key makes a CSR that verifies and carries the token public key', async () => {
    const der = await makeCsrWithTokenKey(key, '/CN=device-0001/O=Acme Devices, Inc./OU=line a/OU=line b');
    const path = join(key.dir, 'plain.csr.der');
    await writeFile(path, der);

    const verify = await runAsync('openssl', ['req', '-inform', 'DER', '-in', path, '-verify', '-noout'], key.env);
    assert.equal(verify.code, 0, verify.stderr);
    assert.match(verify.stdout + verify.stderr, /verify OK/);

    const pub = await execFileAsync('openssl', ['req', '-inform', 'DER', '-in', path, '-pubkey', '-noout'], { env: key.env });
    assert.deepEqual(spkiOfPem(pub.stdout), key.publicKeySpkiDer);

    // An independent parser agrees: signature, key, subject (order and repeated OU kept), no attributes.
    const csr = new Pkcs10CertificateRequest(new Uint8Array(der));
    assert.ok(await csr.verify());
    assert.deepEqual(Buffer.from(csr.publicKey.rawData), key.publicKeySpkiDer);
    assert.equal(csr.subject, 'CN=device-0001, O=Acme Devices\\, Inc., OU=line a, OU=line b');
    assert.equal(csr.signatureAlgorithm.name, 'ECDSA');
    assert.equal(csr.attributes.length, 0);

    // A flipped signature bit makes openssl's verification fail: the check above means something.
    const tampered = Buffer.from(der);
    tampered[tampered.length - 5] ^= 0x01;
    await writeFile(join(key.dir, 'tampered.csr.der'), tampered);
    const bad = await runAsync('openssl', ['req', '-inform', 'DER', '-in', join(key.dir, 'tampered.csr.der'), '-verify', '-noout'], key.env);
    assert.ok(bad.code !== 0 || !/verify OK/.test(bad.stdout + bad.stderr), 'tampered CSR must not verify');
  });

  test('the CSR can carry a challengePassword (and extensions)', async () => {
    const password = 'one-time: $ecret #1 "quoted" \\ end';
    const der = await makeCsrWithTokenKey(key, [['CN', 'device-0002'], ['serialNumber', 'SN-0002']], {
      challengePassword: password,
      addext: ['subjectAltName=DNS:device-0002.example'],
    });
    const path = join(key.dir, 'challenge.csr.der');
    await writeFile(path, der);

    const text = await runAsync('openssl', ['req', '-inform', 'DER', '-in', path, '-verify', '-noout', '-text'], key.env);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout + text.stderr, /verify OK/);
    assert.ok(text.stdout.includes(`challengePassword        :${password}`), text.stdout);
    assert.match(text.stdout, /DNS:device-0002\.example/);

    const csr = new Pkcs10CertificateRequest(new Uint8Array(der));
    assert.ok(await csr.verify());
    assert.deepEqual(Buffer.from(csr.publicKey.rawData), key.publicKeySpkiDer);
    assert.equal(csr.subject, 'CN=device-0002, 2.5.4.5=SN-0002');
    const attr = csr.attributes.find((a) => a.type === CHALLENGE_PASSWORD_OID);
    assert.ok(attr, 'challengePassword attribute present');
    // DirectoryString as UTF8String (tag 0x0c), string_mask utf8only.
    const value = Buffer.from(attr.values[0]!);
    assert.equal(value[0], 0x0c);
    assert.equal(value.subarray(2).toString('utf8'), password);
  });

  describe('TLS client authentication with the token key', () => {
    let server: Server;
    let port: number;
    let serverCertPem: string;
    let clientCertPath: string;
    let clientCertDer: Buffer;
    const peers: Array<{ raw: Buffer | undefined; authorized: boolean; protocol: string | null }> = [];

    before(async () => {
      requireOpensslPkcs11();
      // The client certificate: self-signed by the token key, through the engine.
      clientCertPath = await makeSelfSignedCertWithTokenKey(key, '/CN=device-0001', { addext: ['extendedKeyUsage=clientAuth'] });
      const clientCertPem = await readFile(clientCertPath, 'utf8');
      clientCertDer = Buffer.from(new X509Certificate(clientCertPem).raw);
      assert.deepEqual(Buffer.from(new X509Certificate(clientCertPem).publicKey.export({ format: 'der', type: 'spki' })), key.publicKeySpkiDer);

      // The server: an ordinary file key, trusting exactly the device's certificate.
      const serverKeyPath = join(key.dir, 'server.key');
      const serverCertPath = join(key.dir, 'server.pem');
      await execFileAsync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', serverKeyPath, '-out', serverCertPath, '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-days', '1'], { env: key.env });
      serverCertPem = await readFile(serverCertPath, 'utf8');
      server = createServer({ key: await readFile(serverKeyPath), cert: serverCertPem, ca: clientCertPem, requestCert: true, rejectUnauthorized: true }, (req, res) => {
        const socket = req.socket as TLSSocket;
        res.end(`peer ${socket.getPeerCertificate().subject?.CN ?? 'none'}\n`);
      });
      server.on('secureConnection', (socket: TLSSocket) => {
        const peer = socket.getPeerCertificate(false);
        peers.push({ raw: peer && 'raw' in peer ? peer.raw : undefined, authorized: socket.authorized, protocol: socket.getProtocol() });
      });
      server.on('tlsClientError', () => { /* clients that hang up early; asserted through `peers` */ });
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      port = (server.address() as AddressInfo).port;
    });

    after(async () => {
      if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    });

    function assertPresented(protocol: string): void {
      const peer = peers.at(-1);
      assert.ok(peer, 'the server saw a TLS connection');
      assert.equal(peer.protocol, protocol);
      assert.ok(peer.authorized, 'the client certificate was verified by the server');
      assert.ok(peer.raw, 'the client presented a certificate');
      assert.deepEqual(peer.raw, clientCertDer);
    }

    for (const [protocol, curlVersion] of [['TLSv1.3', ['--tlsv1.3']], ['TLSv1.2', ['--tlsv1.2', '--tls-max', '1.2']]] as const) {
      test(`curl --engine pkcs11 --key-type ENG --key pkcs11:… presents the token key (${protocol})`, { skip: curlPkcs11Skip() }, async () => {
        assert.ok(!curlPkcs11Unavailable(), curlPkcs11Unavailable());
        peers.length = 0;
        const r = await runAsync('curl', ['-sS', '--fail', ...curlVersion, '--cacert', join(key.dir, 'server.pem'), ...key.curlArgs(clientCertPath), `https://127.0.0.1:${port}/`], key.env);
        assert.equal(r.code, 0, `curl failed (${r.code ?? r.signal}): ${r.stderr}`);
        assert.equal(r.stdout, 'peer device-0001\n');
        assertPresented(protocol);
      });
    }

    test('openssl s_client -engine pkcs11 -keyform engine -key pkcs11:… presents the token key', async () => {
      peers.length = 0;
      const r = await runAsync('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, '-CAfile', join(key.dir, 'server.pem'), '-verify_return_error', ...key.opensslKeyArgs, '-cert', clientCertPath], key.env);
      assert.equal(r.code, 0, `s_client failed (${r.code ?? r.signal}): ${r.stderr}`);
      assert.match(r.stdout, /Verify return code: 0 \(ok\)/);
      // In TLS 1.3 the server finishes verifying the client after the client's Finished: give it a moment.
      for (let i = 0; i < 50 && peers.length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 20));
      assertPresented('TLSv1.3');
    });

    test('without the token key, the server refuses the connection', { skip: curlPkcs11Skip() }, async () => {
      const r = await runAsync('curl', ['-sS', '--cacert', join(key.dir, 'server.pem'), `https://127.0.0.1:${port}/`], key.env);
      assert.notEqual(r.code, 0, 'a client without a certificate must be refused');
    });
  });
});
