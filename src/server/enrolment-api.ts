// Enrolment routes of the admin API: claims (create — the secret is in the answer once —, list,
// revoke) and enrolment requests waiting for approval (list, approve, reject).
// Parse and render only: claims.ts and approvals.ts decide and persist.

import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Authority } from '../authority/authority.js';
import { parseDuration } from '../authority/tokens.js';
import { createClaim, listClaims, revokeClaim } from '../enrollment/claims.js';
import { decideApproval, listApprovals } from '../enrollment/approvals.js';

const err = { type: 'object', properties: { error: { type: 'object', properties: { code: { type: 'string' }, message: { type: 'string' } } } } } as const;
const errors = { 400: err, 401: err, 403: err, 404: err, 409: err, 500: err, 503: err };
const claimSchema = {
  type: 'object',
  properties: {
    id: { type: 'string' }, batch: { type: 'string' }, maxUses: { type: 'integer' }, used: { type: 'integer' }, perMinute: { type: 'integer' },
    expiresAt: { type: 'string' }, revokedAt: { type: ['string', 'null'] }, createdBy: { type: 'string' }, createdAt: { type: 'string' },
    lastUsedAt: { type: ['string', 'null'] }, status: { type: 'string' },
  },
} as const;
const actorOf = (request: FastifyRequest): string => `token:${request.principal?.tokenId ?? '?'}`;

const approvalSchema = {
  type: 'object',
  properties: {
    id: { type: 'string' }, batch: { type: 'string' }, udid: { type: 'string' }, publicKeySha256: { type: 'string' }, status: { type: 'string' },
    authenticator: { type: 'string' }, source: { type: 'string' }, requestedAt: { type: 'string' }, decidedAt: { type: ['string', 'null'] },
    decidedBy: { type: ['string', 'null'] }, reason: { type: ['string', 'null'] },
  },
} as const;

export function registerEnrolmentApi(app: FastifyInstance, authority: Authority): void {
  const read = { scope: 'registry:read' as const };
  const write = { scope: 'registry:write' as const };

  app.post<{ Body: { batch: string; uses: number; ttl: string; perMinute?: number } }>('/api/v1/claims', {
    config: write,
    schema: {
      summary: 'Create an enrolment claim (HTTP Basic credentials for EST; the secret is returned once)', tags: ['enrolment'],
      body: {
        type: 'object', additionalProperties: false, required: ['batch', 'uses', 'ttl'],
        properties: { batch: { type: 'string', maxLength: 64 }, uses: { type: 'integer', minimum: 1, maximum: 10_000_000 }, ttl: { type: 'string', maxLength: 16, description: 'e.g. 24h, 7d' }, perMinute: { type: 'integer', minimum: 1, maximum: 10_000_000 } },
      },
      response: { 201: { type: 'object', properties: { id: { type: 'string' }, secret: { type: 'string' }, basic: { type: 'string' }, batch: { type: 'string' }, maxUses: { type: 'integer' }, perMinute: { type: 'integer' }, expiresAt: { type: 'string' } } }, ...errors },
    },
  }, async (request, reply) => {
    const claim = await createClaim(authority.store, { batch: request.body.batch, uses: request.body.uses, ttlMs: parseDuration(request.body.ttl), perMinute: request.body.perMinute, actor: actorOf(request) });
    return reply.status(201).header('cache-control', 'no-store').send(claim);
  });

  app.get<{ Querystring: { batch?: string } }>('/api/v1/claims', {
    config: read,
    schema: { summary: 'List enrolment claims (never their secrets)', tags: ['enrolment'], querystring: { type: 'object', additionalProperties: false, properties: { batch: { type: 'string', maxLength: 64 } } }, response: { 200: { type: 'object', properties: { items: { type: 'array', items: claimSchema }, next: { type: ['string', 'null'] } } }, ...errors } },
  }, async (request) => ({ items: await listClaims(authority.store, { batch: request.query.batch }), next: null }));

  app.post<{ Params: { id: string } }>('/api/v1/claims/:id/revoke', {
    config: write,
    schema: { summary: 'Revoke an enrolment claim', tags: ['enrolment'], params: { type: 'object', properties: { id: { type: 'string', pattern: '^cl_[0-9a-f]{16}$' } }, required: ['id'] }, response: { 200: claimSchema, ...errors } },
  }, async (request) => {
    await revokeClaim(authority.store, request.params.id, actorOf(request));
    return (await listClaims(authority.store)).find((c) => c.id === request.params.id);
  });

  app.get<{ Querystring: { status?: 'pending' | 'approved' | 'rejected' | 'used'; batch?: string } }>('/api/v1/enrolments', {
    config: read,
    schema: { summary: 'Enrolment requests of batches that require approval', tags: ['enrolment'], querystring: { type: 'object', additionalProperties: false, properties: { status: { type: 'string', enum: ['pending', 'approved', 'rejected', 'used'] }, batch: { type: 'string', maxLength: 64 } } }, response: { 200: { type: 'object', properties: { items: { type: 'array', items: approvalSchema }, next: { type: ['string', 'null'] } } }, ...errors } },
  }, async (request) => ({ items: await listApprovals(authority.store, { status: request.query.status, batch: request.query.batch }), next: null }));

  for (const decision of ['approve', 'reject'] as const) {
    app.post<{ Params: { id: string }; Body: { reason?: string } | undefined }>(`/api/v1/enrolments/:id/${decision}`, {
      config: write,
      schema: { summary: `${decision === 'approve' ? 'Approve' : 'Reject'} a pending enrolment request`, tags: ['enrolment'], params: { type: 'object', properties: { id: { type: 'string', pattern: '^er_[0-9a-f]{16}$' } }, required: ['id'] }, body: { type: ['object', 'null'], additionalProperties: false, properties: { reason: { type: 'string', maxLength: 500 } } }, response: { 200: approvalSchema, ...errors } },
    }, async (request) => decideApproval(authority.store, request.params.id, decision, actorOf(request), request.body?.reason));
  }
}
