"""A real `clipbeam serve` on 127.0.0.1: HTTP clients, clip-retrieval's front's request, and Chromium."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from browser import chromium
from PIL import Image
from servehelpers import running_server, shapes_index

from clipbeam.cli import main
from clipbeam.models.shapes import class_names


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shapes_index(tmp_path_factory)


@pytest.fixture(scope="module")
def server(built):
    with running_server(built["index"]) as url:
        yield url


def test_concurrent_clients_over_loopback(server):
    labels = [f"a {color} {shape}" for color, shape in class_names()]

    def ask(text: str) -> dict:
        with httpx.Client(base_url=server, timeout=60) as client:
            return client.post("/search", json={"text": text, "k": 5}).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, labels * 2))
    assert all(len(a["results"]) == 5 for a in answers)
    top = [a["results"][0]["caption"] for a in answers]
    assert sum(caption == label for caption, label in zip(top, labels * 2, strict=True)) >= 0.9 * len(top)
    stats = httpx.get(server + "/stats").json()
    assert stats["by_kind"]["text"]["served"] >= 48 and stats["latency_ms"]["p99"] > 0


def test_knn_service_answers_the_clip_front_request_with_clipbeam_search_ids(server, built, capsys):
    assert main(["search", "--index", built["index"], "--text", "a red circle", "-k", "20", "--json"]) == 0
    expected = [json.loads(line)["faiss_id"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (name,) = httpx.get(server + "/indices-list").json()
    # clip-retrieval's front (clip-service.js) posts JSON.stringify(...) as text/plain, with these fields
    body = json.dumps({"text": "a red circle", "image": None, "image_url": None, "modality": "image",
                       "num_images": 10, "indice_name": name, "num_result_ids": 20, "use_mclip": False,
                       "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
                       "aesthetic_score": "", "aesthetic_weight": ""})
    response = httpx.post(server + "/knn-service", content=body, headers={"Content-Type": "text/plain"})
    assert response.status_code == 200
    results = response.json()
    assert [r["id"] for r in results] == expected
    assert all(r["caption"] == "a red circle" and r["url"].startswith(server + "/image/") for r in results[:10])
    assert all(set(r) == {"id", "similarity"} for r in results[10:])
    assert httpx.get(results[0]["url"]).headers["content-type"] == "image/png"
    meta = httpx.post(server + "/metadata", content=json.dumps({"ids": expected[10:12], "indice_name": name}))
    assert [m["id"] for m in meta.json()] == expected[10:12] and meta.json()[0]["metadata"]["caption"]


LOADED = """
const imgs = Array.from(document.querySelectorAll('#results .result img'));
return imgs.length === arguments[0] && imgs.every(i => i.complete && i.naturalWidth > 0);
"""
IDS = "return Array.from(document.querySelectorAll('#results .result')).map(e => e.dataset.id);"


def test_the_page_in_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(1200, 900) as driver:
        driver.get(server + "/")
        box = driver.find_element(By.ID, "q")
        box.send_keys("a red circle", Keys.ENTER)
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(LOADED, 10))
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .caption")]
        assert captions == ["a red circle"] * 10
        before = driver.execute_script(IDS)
        driver.find_elements(By.CSS_SELECTOR, "#results .result")[0].click()
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "const i = document.getElementById('detail-img');"
            "return !document.getElementById('detail').hidden && i.complete && i.naturalWidth > 0"
            " && document.querySelectorAll('#detail-meta dt').length > 3"))
        terms = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#detail-meta dt")]
        assert {"id", "caption", "source", "source_offset"} <= set(terms)
        driver.find_element(By.ID, "more").click()
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(IDS) != before and d.execute_script(LOADED, 10))
        after = driver.execute_script(IDS)
        assert after[0] == before[0] and after != before  # the sample itself first, then its neighbours
        assert "more like" in driver.find_element(By.ID, "status").text
        # an uploaded picture (a blue star of the corpus) finds itself first
        star = httpx.post(server + "/search", json={"text": "a blue star", "k": 1}).json()["results"][0]
        (tmp_path / "star.png").write_bytes(httpx.get(server + star["image_url"]).content)
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "star.png"))
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(IDS)[:1] == [str(star["faiss_id"])]
                                        and d.execute_script(LOADED, 10))
        assert "star.png" in driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(tmp_path / "serve.png"))
    shot = Image.open(tmp_path / "serve.png")
    assert shot.size[0] > 0 and len(set(shot.convert("L").getdata())) > 2
