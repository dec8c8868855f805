// The clipbeam search page: plain JS, no build step, talking to this server's own API.
'use strict';

const $ = (id) => document.getElementById(id);
const THUMBNAIL = 160;

async function postSearch(body) {
  const response = await fetch('/search', {
    method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function wantedK() {
  const k = parseInt($('k').value, 10);
  return Number.isFinite(k) ? Math.max(1, Math.min(1000, k)) : 10;
}

async function search(query, label) {
  $('status').textContent = 'searching…';
  try {
    const data = await postSearch({...query, k: wantedK()});
    render(data.results);
    $('status').textContent = `${data.results.length} results for ${label} in ${data.took_ms.toFixed(1)} ms`;
  } catch (error) {
    $('status').textContent = `error: ${error.message}`;
  }
}

function render(results) {
  const cards = results.map((result) => {
    const card = document.createElement('figure');
    card.className = 'result';
    card.dataset.id = String(result.faiss_id);
    const img = document.createElement('img');
    img.className = 'thumb';
    img.src = `${result.image_url}?size=${THUMBNAIL}`;
    img.alt = result.caption || result.id;
    const caption = document.createElement('figcaption');
    const text = document.createElement('span');
    text.className = 'caption';
    text.textContent = result.caption || '';
    const score = document.createElement('span');
    score.className = 'score';
    score.textContent = result.score.toFixed(3);
    caption.append(text, score);
    card.append(img, caption);
    card.addEventListener('click', () => showDetail(result));
    return card;
  });
  $('results').replaceChildren(...cards);
}

async function showDetail(result) {
  $('detail-img').src = result.image_url;
  const list = $('detail-meta');
  list.replaceChildren();
  $('detail').hidden = false;
  $('more').onclick = () => {
    $('detail').hidden = true;
    search({like: result.faiss_id}, `more like ${result.id}`);
  };
  const response = await fetch(`/item/${result.faiss_id}`);
  const item = await response.json();
  for (const [key, value] of Object.entries(item)) {
    const term = document.createElement('dt');
    term.textContent = key;
    const detail = document.createElement('dd');
    detail.textContent = value === null ? '—' : String(value);
    list.append(term, detail);
  }
}

function searchImage(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const url = String(reader.result);
    const preview = $('query-preview');
    preview.src = url;
    preview.hidden = false;
    search({image: url.slice(url.indexOf(',') + 1)}, file.name);
  };
  reader.readAsDataURL(file);
}

async function showStats() {
  try {
    const stats = await (await fetch('/stats')).json();
    $('about').textContent = `${stats.index}: ${stats.vectors} vectors in ${stats.shards} shard(s), ` +
      `${stats.factory}, recall@10 ${stats.recall_at_10 ?? '?'}, model ${stats.model ?? 'none'}`;
  } catch (error) {
    $('about').textContent = '';
  }
}

document.addEventListener('DOMContentLoaded', () => {
  $('search').addEventListener('submit', (event) => {
    event.preventDefault();
    const text = $('q').value.trim();
    if (text) search({text}, `“${text}”`);
  });
  $('file').addEventListener('change', (event) => searchImage(event.target.files[0]));
  const drop = $('drop');
  drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    searchImage(event.dataTransfer.files[0]);
  });
  $('close').addEventListener('click', () => { $('detail').hidden = true; });
  showStats();
});
